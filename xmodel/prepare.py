"""Tokenise a text corpus into token shards for training: ``python -m xmodel.prepare SOURCES... --tokenizer PATH
--out DIR [--workers N] [--text-field F] [--bos auto|always|never] [--skip-bad]`` (also ``xmodel-prepare``).

SOURCES are ``.txt`` files (one document each), ``.jsonl`` (one document per line, the ``--text-field`` string),
``.parquet`` (that column), directories (every such file under them) and globs.  The work runs in ``--workers``
processes (default: one per core, each with a single-threaded tokenizer), streams (memory bounded whatever the
corpus size), shows a progress bar (MB/s, tokens/s, ETA) and ends with a summary.  The token stream is the same for
every worker count; an interrupted run continues where it stopped (finished parts are kept).  Train on the result
with ``python -m xmodel.train --data DIR`` (the tokenizer recorded in ``DIR/manifest.json`` is used when
``--tokenizer`` is not given).  Details: :mod:`xmodel.training.preprocess`.

Exit status: 0 done, 1 the work failed (disk full, ...), 2 bad input (a file, the tokenizer, an option), 130
interrupted (rerun the same command to continue).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m xmodel.prepare", description=__doc__.split("\n\n")[0].split(": ", 1)[0] + ".",
        epilog="exit status: 0 done, 1 the work failed, 2 bad input, 130 interrupted (rerun to continue)")
    parser.add_argument("sources", nargs="+", help=".txt/.jsonl/.parquet files, directories or globs")
    parser.add_argument("--tokenizer", required=True, help="a tokenizer.json or the directory holding it")
    parser.add_argument("--out", required=True, help="output directory (parts/ and manifest.json)")
    parser.add_argument("--workers", type=int, default=0, help="worker processes (default 0: one per CPU core)")
    parser.add_argument("--text-field", default="text", help="the text field of .jsonl records / .parquet column")
    parser.add_argument("--bos", choices=("auto", "always", "never"), default="auto",
                        help="BOS before each document: auto = as the tokenizer_config.json's add_bos_token says")
    parser.add_argument("--skip-bad", action="store_true",
                        help="skip (and count) unreadable/empty files and bad records instead of stopping")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    from xmodel.training.data import SourceSpec, file_kind
    from xmodel.training.preprocess import BadInput, prepare
    from xmodel.training.tokenizer import TextTokenizer

    try:
        if args.workers < 0:
            raise ValueError(f"--workers: must be >= 0 (0 = one per core), got {args.workers}")
        tokenizer = TextTokenizer.load(args.tokenizer)
        framing = tokenizer.framing(args.bos)
        files: list[Path] = []
        for source in args.sources:
            found = SourceSpec(source).files("sources")
            tokens = [f for f in found if file_kind(f) != "text"]
            if tokens:
                raise ValueError(f"{tokens[0]} is already tokenised; python -m xmodel.train reads it as it is")
            files += found
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out: {out} is a file, not a directory")
        prepare(files, tokenizer, framing, out, args.text_field, args.workers, args.skip_bad, args.progress)
    except (BadInput, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished parts are kept; run the same command again to continue", file=sys.stderr)
        return 130
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
