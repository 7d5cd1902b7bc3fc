"""Build speed, cached load and recall@K of the RETRO database over the embedded corpus.

    python scripts/retro_database.py [--index auto|flat|ivf|ivfpq|hnsw] [--max-documents N]

Options and what it measures: `advarch/benchmarks/retro_database.py`.
"""

from advarch.benchmarks.retro_database import main

if __name__ == "__main__":
    main()
