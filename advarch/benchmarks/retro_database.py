"""Build speed, cached load and recall@K of the RETRO database over the embedded corpus.

    python scripts/retro_database.py [--index auto|flat|ivf|ivfpq|hnsw] [--max-documents N]
        [--chunk-size 64] [--k 2] [--queries 2000] [--nprobe 16] [--skip-neighbours]

Tokenises the stdlib corpus as `data=text` does (cached), then, for the training split:
1. embeds and indexes every database chunk (hashed n-grams, the default retriever), with a
   progress bar: chunks per second of embedding + indexing;
2. precomputes the neighbours of every training query chunk (what `data=text_retrieval`
   stores; not with `--skip-neighbours`), and saves the database to a fresh cache folder;
3. loads it again from the cache (what a second run does);
4. searches `--queries` random held-out chunks with the index and exactly (brute force over
   the embeddings): recall@K = share of the exact top K the index returns.
Prints one line per measurement and writes `<out>/<time>_<id>/retro_database_<index>.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TextIO

import numpy as np
from tqdm.auto import tqdm

from advarch.data.chunk_embedders import HashedNgramEmbedder
from advarch.data.corpus import SPLITS
from advarch.data.packing import TooFewTokens
from advarch.data.retrieval_database import INDEX_KINDS, RetrievalDatabase
from advarch.output_folders import exit_if_unmakeable, stamped_folder


class FrameLines:
    """The stream of a progress bar where output is not a terminal: each frame a line of its
    own (tqdm redraws over `\r`, which ran the 0% and 100% frames into one line)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream, self.encoding = stream, getattr(stream, "encoding", None)  # (its bar style)

    def write(self, text: str) -> None:
        frame = text.replace("\r", "").rstrip()
        if frame:
            self.stream.write(frame + "\n")

    def flush(self) -> None:
        self.stream.flush()


def recall_at_k(db: RetrievalDatabase, queries: np.ndarray, k: int) -> float:
    """Share of the exact top-k chunks (by inner product) among the index's top k, searched as
    the database searches (k + search_margin hits, so ivfpq re-ranks as many candidates)."""
    approx = db._index_search(queries, k + db.search_margin)[:, :k]  # (n, k)
    emb = np.asarray(db.embeddings)
    exact = np.argsort(-(queries @ emb.T), axis=1)[:, :k]  # (n, k) brute force
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact, strict=True)]))


def check_options(args: argparse.Namespace) -> None:
    """Exit with one `error:` line naming the first bad option, before any tokenising or
    embedding (faiss and numpy raised tracebacks at the end, `--queries 0` printed a NaN
    recall, the data module named its own keys, `--out` a file failed after all the work)."""
    shortest = min(HashedNgramEmbedder().n)
    minimums = [
        ("--chunk-size", args.chunk_size, shortest,
         f" (the embedder hashes {shortest}-token n-grams: a shorter chunk embeds to nothing)"),
        ("--k", args.k, 1, ""),
        ("--queries", args.queries, 1, ""),
        ("--nprobe", args.nprobe, 1, ""),
        ("--max-documents", args.max_documents, len(SPLITS),
         " (a document each for train, val and test)"),
    ]  # fmt: skip
    for option, value, least, why in minimums:
        if value is not None and value < least:
            sys.exit(f"error: {option} {value} must be at least {least}{why}")
    exit_if_unmakeable(Path(args.out))


def too_few_tokens(err: TooFewTokens, args: argparse.Namespace) -> str:
    """The data module's "fewer than data.seq_len" said with this script's options."""
    docs = f" of --max-documents {args.max_documents}" if args.max_documents else ""
    fix = "raise --max-documents or lower --chunk-size" if docs else "lower --chunk-size"
    return (
        f"the {err.label}{docs} has {err.tokens} tokens, fewer than the {err.seq_len + 1} of "
        f"one sequence (4 × --chunk-size {args.chunk_size}, + 1): {fix}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", default="auto", choices=INDEX_KINDS)
    parser.add_argument("--max-documents", type=int, default=None)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--k", type=int, default=2, help="neighbours per chunk, and recall@K")
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--out", default="outputs/retro_database")
    parser.add_argument(
        "--skip-neighbours",
        action="store_true",
        help="skip the neighbour precomputation (data.retrieval.precompute=false)",
    )
    args = parser.parse_args()
    check_options(args)
    import datasets  # (with Lightning: seconds, after the options' one-line checks)

    from advarch.data.text import TextDataModule

    datasets.disable_progress_bars()  # a bar for every tiny save of the tokenised corpus
    try:  # a corpus too small for its splits in one line
        # sequences of 4 chunks: the cache data=text_retrieval builds (seq_len 256, chunks of 64)
        dm = TextDataModule(max_documents=args.max_documents, seq_len=args.chunk_size * 4)
        dm.prepare_data()
        tokens, docs = (np.load(dm.cache_dir / f"train_{n}.npy") for n in ("tokens", "docs"))
        pad = dm.meta["pad_id"]
        db = RetrievalDatabase(tokens, docs, pad_id=pad, chunk_size=args.chunk_size,
                               num_neighbours=args.k, embedder=HashedNgramEmbedder(pad_id=pad),
                               index=args.index, nprobe=args.nprobe)  # fmt: skip
    except TooFewTokens as err:
        sys.exit(f"error: {too_few_tokens(err, args)}")
    except ValueError as err:
        sys.exit(f"error: {err}")
    m = len(db.chunks)
    if args.k > m:  # (recall@K then counted missing hits; the neighbour table filled memory)
        sys.exit(f"error: --k {args.k} exceeds the database's {m} chunks")
    t0, cpu0 = time.perf_counter(), time.process_time()
    parts, step = [], 16384
    lines = None if sys.stderr.isatty() else FrameLines(sys.stderr)
    with tqdm(total=m, desc="embed database", unit="chunk", file=lines) as bar:  # (not steps)
        for i in range(0, m, step):
            parts.append(db.embedder.embed(db.chunks[i : i + step]))
            bar.update(len(parts[-1]))
    db.embeddings = np.concatenate(parts)
    t_embed = time.perf_counter() - t0
    db._index = db._build_index(db.embeddings)
    t_index = time.perf_counter() - t0 - t_embed
    cpu_build = time.process_time() - cpu0
    t1 = time.perf_counter()
    starts = np.arange(db.num_query_chunks) * db.chunk_size
    if args.skip_neighbours:
        db.precompute = False
        db.train_neighbours = np.full((db.num_query_chunks, args.k), -2, dtype=np.int64)
    else:
        db.train_neighbours = db._stream_neighbour_ids(starts, missing_ok=True)
    t_neigh = time.perf_counter() - t1
    with tempfile.TemporaryDirectory() as tmp:
        db.save(tmp)
        t2 = time.perf_counter()
        again = RetrievalDatabase(tokens, docs, pad_id=pad, chunk_size=args.chunk_size,
                                  num_neighbours=args.k, embedder=HashedNgramEmbedder(pad_id=pad),
                                  index=args.index, nprobe=args.nprobe,
                                  precompute=not args.skip_neighbours)  # fmt: skip
        assert again.load(tmp)
        again.batch_neighbours(starts[:64:4], 4 * args.chunk_size)  # touch the table
        t_load = time.perf_counter() - t2
    val, _ = (np.load(dm.cache_dir / f"val_{n}.npy") for n in ("tokens", "docs"))
    c = args.chunk_size
    rng = np.random.default_rng(0)
    picks = rng.choice(len(val) // c, size=min(args.queries, len(val) // c), replace=False)
    queries = db.embedder.embed(val[picks[:, None] * c + np.arange(c)])
    recall = recall_at_k(db, queries, args.k)
    report = {
        "index": db.resolved_index_kind, "chunks": m, "query_chunks": db.num_query_chunks,
        "embed_s": t_embed, "index_s": t_index,
        "chunks_per_s_embed_index": m / (t_embed + t_index),
        "cpu_s_embed_index": cpu_build, "chunks_per_cpu_s": m / cpu_build,
        "neighbours_s": "skipped" if args.skip_neighbours else t_neigh,
        "cached_load_s": t_load, f"recall@{args.k}": recall,
        **({"nprobe": args.nprobe} if "ivf" in db.resolved_index_kind else {}),  # (IVF's alone)
        "max_documents": args.max_documents,
    }  # fmt: skip
    for key, value in report.items():
        print(f"{key:28s} {value:.4g}" if isinstance(value, float) else f"{key:28s} {value}")
    out = stamped_folder(Path(args.out))  # (a rerun's beside it: checked up front, makeable)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"retro_database_{db.resolved_index_kind}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
