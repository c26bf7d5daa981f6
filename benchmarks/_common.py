"""Helpers shared by the benchmark scripts (run as `python benchmarks/<name>.py`)."""

from __future__ import annotations

import os


def load_avg() -> str:
    """The 1/5/15-minute load averages: printed with every measurement (shared machines are noisy)."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def free_port(n: int = 3) -> int:
    """A port p with p..p+n-1 free on loopback (a job's MASTER_PORT, its trainers' group and its store)."""
    import random
    import socket

    for _ in range(200):
        base = random.randint(20000, 60000)
        socks = []
        try:
            for k in range(n):
                s = socket.socket()
                s.bind(("127.0.0.1", base + k))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def build_rag_world(args, prefix: str):
    """The synthetic world, the retriever, the generator and the frozen index the step benchmarks share.

    ``args`` needs ``quick``, ``embedder``, ``generator`` and ``max_passage_chars``. Returns a namespace
    with data, corpus, embedder, generator, index, ecfg, gcfg, label and tmp (keep it alive: with
    ``--quick`` the tiny models live in that temporary folder).
    """
    import tempfile
    import types

    from distrag.config import EmbedderConfig, GeneratorConfig, IndexConfig, SyntheticConfig
    from distrag.data.synthetic import make_synthetic
    from distrag.models.embedder import Embedder
    from distrag.models.generator import Generator
    from distrag.retrieval.sharded_index import ShardedIndex

    data = make_synthetic(SyntheticConfig(n_entities=120, n_single_hop=240, n_two_hop=120))
    tmp = None
    if args.quick:
        from distrag.models.tiny import make_tiny_causal_lm, make_tiny_encoder

        tmp = tempfile.TemporaryDirectory(prefix=prefix)
        texts = data.corpus.texts()[:300]
        emb_spec = str(make_tiny_encoder(f"{tmp.name}/enc", texts=texts, hidden=64, layers=2))
        gen_spec = str(make_tiny_causal_lm(f"{tmp.name}/lm", texts=texts, hidden=64, layers=2))
        label = "tiny random Llama + BERT (--quick)"
    else:
        emb_spec, gen_spec = args.embedder, args.generator
        label = f"{gen_spec} + {emb_spec}"
    ecfg = EmbedderConfig(model=emb_spec)
    gcfg = GeneratorConfig(model=gen_spec, max_passage_chars=args.max_passage_chars, dtype="float32")
    embedder = Embedder.from_config(ecfg, device="cpu")
    embedder.eval()
    generator = Generator.from_config(gcfg, device="cpu")
    index = ShardedIndex.from_config(embedder.dim, IndexConfig()).build(embedder.encode(data.corpus.texts()))
    return types.SimpleNamespace(data=data, corpus=data.corpus, embedder=embedder, generator=generator,
                                 index=index, ecfg=ecfg, gcfg=gcfg, label=label, tmp=tmp)
