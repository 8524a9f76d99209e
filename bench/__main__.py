"""`python -m bench`: run every benchmark and print its figures.

Flags (such as --updates) go to the ingest benchmark. The pipeline latency benchmark runs a short
version here (PIPELINE_ARGV, about a minute); `python -m bench.pipeline_latency` is the issue's
full run (10,000 signals) and takes its own flags.
"""

import sys

from bench import book_apply, ingest_pipeline, pipeline_latency

PIPELINE_ARGV = ["--signals", "2000"]

if __name__ == "__main__":
    ingest_argv = sys.argv[1:]  # flags such as --updates go to the ingest benchmark
    ingest_pipeline.parse_args(ingest_argv)  # a bad flag (or --help) stops here, before any benchmark runs
    book_apply.main()
    print()
    ingest_pipeline.main(ingest_argv)
    print()
    pipeline_latency.main(PIPELINE_ARGV)
