"""RAGPipeline over a built index: retrieval equals brute force on the embedder's vectors, evaluate()
scores answers and retrieval, both decodings run and are charged, an unknown decoding is refused."""

from __future__ import annotations

import pytest
import torch

from distrag.config import SyntheticConfig, build_config
from distrag.costs.accountant import Accountant
from distrag.costs.ledger import CostLedger
from distrag.data.records import Question
from distrag.data.synthetic import make_synthetic
from distrag.models.embedder import Embedder
from distrag.models.generator import Generator
from distrag.retrieval.corpus_encoding import encode_corpus
from distrag.retrieval.pipeline import RAGPipeline
from distrag.retrieval.sharded_index import ShardedIndex

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def world(tiny_encoder_dir, tiny_lm_dir):
    torch.set_num_threads(1)
    cfg = build_config({
        "embedder": {"model": str(tiny_encoder_dir), "max_length": 48},
        "generator": {"model": str(tiny_lm_dir), "max_passage_chars": 60, "max_new_tokens": 3},
        "retrieval": {"top_k": 3}, "index": {"device": "cpu", "n_shards": 2},
        "train": {"train_k": 2}, "tracking": {"enabled": False},
    })
    data = make_synthetic(SyntheticConfig(n_entities=8, n_single_hop=6, n_two_hop=2))
    embedder = Embedder.from_config(cfg.embedder, device="cpu")
    embedder.eval()
    generator = Generator.from_config(cfg.generator, device="cpu")
    vectors = encode_corpus(embedder, data.corpus)
    index = ShardedIndex.from_config(vectors.shape[1], cfg.index).build(vectors)
    return {"cfg": cfg, "data": data, "embedder": embedder, "generator": generator, "index": index,
            "vectors": vectors}


def _pipeline(world, ledger: CostLedger | None = None) -> RAGPipeline:
    return RAGPipeline(world["cfg"], world["data"].corpus, world["embedder"], world["generator"], world["index"],
                       accountant=Accountant(ledger) if ledger is not None else None)


def test_retrieve_returns_the_brute_force_top_k_of_the_embedders_vectors(world):
    questions = world["data"].questions
    ledger = CostLedger()
    res = _pipeline(world, ledger).retrieve(questions, return_vectors=True)
    q = world["embedder"].encode([x.text for x in questions])
    scores = q @ world["vectors"].T
    assert res.ids.shape == (len(questions), 3)  # retrieval.top_k
    for row, found in zip(scores, res.ids):
        assert found.tolist() == sorted(range(len(row)), key=lambda i: (-row[i], i))[:3]
    torch.testing.assert_close(torch.from_numpy(res.vectors), torch.from_numpy(world["vectors"][res.ids]))
    assert _pipeline(world).retrieve(questions[:2], k=5).ids.shape == (2, 5)
    assert ledger.flops("encode_questions") > 0 and ledger.flops("encode_passages") == 0


def _probe_questions(world, answers: list[tuple[str, ...]]) -> list[Question]:
    """Questions whose text is a passage's own text (so that passage is retrieved first)."""
    corpus = world["data"].corpus
    return [Question(f"p{i}", corpus[i].as_text(), a, (corpus[i].id,)) for i, a in enumerate(answers)]


def test_evaluate_scores_answers_and_retrieval(world, monkeypatch):
    corpus = world["data"].corpus
    word = corpus[2].text.split()[0]  # a word of passage 2: found in its top-k passages
    questions = _probe_questions(world, [("Qxv Zyw",), ("Kpq Wzx",), (word,), ("Zzq",)])
    prompts_seen: list[str] = []

    def generate(prompts, **kw):  # the tiny random LM answers "": script the answers instead
        prompts_seen.extend(prompts)
        return ["qxv zyw", "Kpq", "nothing", ""]

    monkeypatch.setattr(world["generator"], "generate", generate)
    res = _pipeline(world).evaluate(questions, show_progress=False)
    assert [r[0] for r in res.retrieved] == [corpus[i].id for i in range(4)]  # each question's own passage
    assert all(corpus[i].title in prompt for i, prompt in enumerate(prompts_seen))
    assert res.predictions == ["qxv zyw", "Kpq", "nothing", ""]
    assert res.metrics["em"] == pytest.approx(1 / 4)  # normalised exact match on the first only
    assert res.metrics["f1"] == pytest.approx((1 + 2 / 3) / 4)  # "Kpq" vs "Kpq Wzx": P 1, R 1/2
    assert res.metrics["recall_at_3"] == 1.0
    assert res.metrics["answer_recall_at_3"] == pytest.approx(1 / 4)
    assert res.metrics["n_questions"] == 4.0
    assert set(res.seconds) == {"retrieve", "generate", "total"}
    rows = res.rows(questions)
    assert [(r["prediction"], r["gold_passage_ids"]) for r in rows][:2] == [("qxv zyw", [corpus[0].id]),
                                                                          ("Kpq", [corpus[1].id])]


def test_concat_and_rag_decoding_both_run_and_are_charged(world):
    questions = world["data"].questions[:3]
    for decoding, category in (("concat", "generate"), ("rag", "score")):
        ledger = CostLedger()
        res = _pipeline(world, ledger).evaluate(questions, show_progress=False, decoding=decoding)
        assert len(res.predictions) == 3 and all(isinstance(p, str) for p in res.predictions)
        assert 0.0 <= res.metrics["em"] <= res.metrics["f1"] <= 1.0
        assert ledger.flops("generate") > 0 and ledger.flops(category) > 0
        assert ledger.flops("encode_questions") > 0


def test_unknown_decoding_is_refused(world):
    with pytest.raises(ValueError, match="unknown decoding 'beam'"):
        _pipeline(world).evaluate(world["data"].questions[:1], show_progress=False, decoding="beam")
    with pytest.raises(ValueError, match="unknown decoding 'beam'"):
        pipe = _pipeline(world)
        pipe.decode(world["data"].questions[:1], pipe.retrieve(world["data"].questions[:1]), decoding="beam")


def test_decode_is_what_evaluate_answers_with(world, monkeypatch):
    """A saved pipeline answers through decode(): it must be evaluate()'s choice, call for call."""
    questions = world["data"].questions[:2]
    pipe = _pipeline(world)
    res = pipe.retrieve(questions)
    monkeypatch.setattr(pipe, "answer", lambda qs, r, **kw: ["concat"] * len(qs))
    monkeypatch.setattr(pipe, "answer_rag", lambda qs, r, **kw: ["rag"] * len(qs))
    for decoding in ("concat", "rag"):
        assert pipe.decode(questions, res, decoding=decoding) == [decoding] * 2
        assert pipe.evaluate(questions, show_progress=False, decoding=decoding).predictions == [decoding] * 2


def test_f1_follows_the_hotpotqa_script_on_hotpotqa_only(world, monkeypatch):
    questions = _probe_questions(world, [("yes",), ("no way",)])
    monkeypatch.setattr(world["generator"], "generate", lambda prompts, **kw: ["yes it is", "no"])
    squad = _pipeline(world).evaluate(questions, show_progress=False)
    assert squad.metrics["f1"] == pytest.approx((0.5 + 2 / 3) / 2)  # SQuAD v1.1: token overlap
    hotpot_cfg = build_config(world["cfg"].model_dump(mode="json"),
                              overrides=["data.format=hotpotqa", "data.path=dev.json"])
    hotpot = RAGPipeline(hotpot_cfg, world["data"].corpus, world["embedder"], world["generator"],
                         world["index"]).evaluate(questions, show_progress=False)
    assert hotpot.metrics["f1"] == 0.0  # HotPotQA: a yes/no answer matches exactly or not at all


def test_recall_at_k_counts_each_gold_passage_and_recall_all_needs_all(world, monkeypatch):
    corpus = world["data"].corpus
    far = len(corpus) - 1  # a gold passage the question's own text does not retrieve first
    questions = [Question("q0", corpus[0].as_text(), ("x",), (corpus[0].id, corpus[far].id))]
    monkeypatch.setattr(world["generator"], "generate", lambda prompts, **kw: ["x"])
    res = _pipeline(world).evaluate(questions, show_progress=False)
    found = sum(i in res.retrieved[0] for i in (corpus[0].id, corpus[far].id))
    assert res.metrics["recall_at_3"] == pytest.approx(found / 2)
    assert res.metrics["recall_all_at_3"] == float(found == 2)


def test_retrieval_only_pass_scores_every_question_without_the_generator(world, monkeypatch):
    """evaluate_retrieval: the retrieval metrics evaluate() reports, on any number of questions, in batches, with
    the generator never called; MRR and nDCG with them; per-question outcomes in question order."""
    questions = world["data"].questions
    full = _pipeline(world).evaluate(questions, show_progress=False)

    def no_generation(*a, **k):
        raise AssertionError("the retrieval-only pass must not generate")

    monkeypatch.setattr(world["generator"], "generate", no_generation)
    ledger = CostLedger()
    for batch in (1, 3, 1000):
        r = _pipeline(world, ledger).evaluate_retrieval(questions, batch_size=batch, show_progress=False)
        assert r.metrics["n_questions"] == len(questions)
        for name in ("recall_at_3", "recall_all_at_3", "answer_recall_at_3", "mrr_at_3", "ndcg_at_3"):
            assert r.metrics[name] == pytest.approx(full.metrics[name]), name
        assert r.retrieved == full.retrieved
        assert [{k: o[k] for k in r.per_question[0]} for o in full.per_question] == r.per_question
    assert ledger.flops("encode_questions") > 0 and ledger.flops("generate") == 0
    rows = r.rows(questions)
    assert [x["id"] for x in rows] == [q.id for q in questions] and "mrr" in rows[0]
    assert {"em", "f1", "mrr"} <= set(full.rows(questions)[0])
