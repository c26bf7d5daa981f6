"""The bundle's model card (its README.md): what the pipeline is, how good it was, what it cost, how to use it.

Written from bundle.json alone (:func:`model_card`), so the card never says what the manifest does not. The
numbers are the run's own: quality on the evaluated split with 95 % intervals (EM: Wilson, as the report's
table; F1: a bootstrap of the per-question mean), Recall@k and the other retrieval scores at the k it answers
with, and the ledger's costs (training and total FLOPs, wall-clock, device-hours, peak memory). It links the
comparison it came from: the MLflow run and the report of its comparison group (``distrag report``), whose
table links back to each row's bundle.
"""

from __future__ import annotations

from distrag import metric_names as mn
from distrag.reporting.columns import fmt_flops

REPORT_FROM_BUNDLE = "../../report/report.html"
"""The default report's place seen from a bundle in ``<output_dir>/models/<name>/``."""
_RETRIEVAL = (("recall", "Recall@{k}"), ("recall_all", "Recall-all@{k}"), ("answer_recall", "Answer recall@{k}"),
              ("mrr", "MRR@{k}"), ("ndcg", "nDCG@{k}"))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _quality_rows(ev: dict, k: int) -> list[str]:
    q, ci = ev["quality"], ev["intervals"]
    rows = []
    for name, label in (("em", "EM"), ("f1", "F1")):
        lo_hi = ci.get(name)
        rows.append(f"| {label} | {_pct(q.get(name))} | "
                    f"{f'{_pct(lo_hi[0])}-{_pct(lo_hi[1])}' if lo_hi else '-'} |")
    for name, label in _RETRIEVAL:
        value = q.get(f"{name}_at_{k}")
        if value is not None:
            rows.append(f"| {label.format(k=k)} | {_pct(value)} | |")
    n_retrieval = q.get(mn.N_RETRIEVAL_QUESTIONS)
    if n_retrieval is not None and int(n_retrieval) != ev["n_questions"]:
        rows += ["", f"Retrieval is scored on all {int(n_retrieval)} questions of the split; EM and F1 on the first "
                     f"{ev['n_questions']} (`max_eval_questions`)."]
    return rows


def _cost_rows(costs: dict) -> list[str]:
    def num(key: str, fmt: str) -> str:
        v = costs.get(key)
        return "-" if v is None else fmt.format(v)

    return [f"| Training FLOPs | {fmt_flops(costs.get(mn.COST_TRAIN_FLOPS))} |",
            f"| Total FLOPs (index, training, evaluation) | {fmt_flops(costs.get(mn.COST_TOTAL_FLOPS))} |",
            f"| Wall-clock | {num(mn.COST_WALL_S, '{:.0f} s')} |",
            f"| Device-hours | {num(mn.COST_DEVICE_HOURS, '{:.4f}')} |",
            f"| Peak host memory (RSS) | {num(mn.COST_PEAK_RSS_GB, '{:.2f} GB')} |",
            f"| Peak device memory | {num(mn.COST_PEAK_DEVICE_GB, '{:.2f} GB')} |",
            f"| Trainable parameters | {num(mn.COST_TRAINABLE_PARAMS, '{:,.0f}')} |"]


def _parts(m: dict) -> list[str]:
    emb, gen, idx, corpus = m["embedder"], m["generator"], m["index"], m["corpus"]
    encoder = (f"`{emb['base']}`, fine-tuned: `{emb['path']}/` (sentence-transformers layout)" if emb["trained"]
               else f"`{emb['base']}` (base, not trained; its files' sha256 is checked at load)")
    if gen["adapter"]:
        lora = gen["lora"] or {}
        generator = (f"`{gen['base']}` + LoRA adapter `{gen['adapter']}/` (peft format; r={lora.get('r')}, "
                     f"alpha={lora.get('alpha')}, {', '.join(lora.get('target_modules', []))})")
    else:
        generator = f"`{gen['base']}` (base, not trained)"
    if gen["merged"]:
        generator += f"; merged copy: `{gen['merged']}/` (plain transformers folder)"
    where = f"`{corpus['path']}`" if corpus["path"] else f"referenced: `{corpus['reference']['path']}` (sha256 checked)"
    return [f"| Question encoder | {encoder} |", f"| Generator | {generator} |",
            f"| Index | `{idx['path']}/`: {idx['kind']}, {idx['n_shards']} shard(s), {idx['count']:,} passages, "
            f"{idx['passage_vectors']} passage vectors |",
            f"| Corpus | {corpus['passages']:,} passages, {where} |",
            f"| Answers with | top-{m['retrieval']['top_k']} passages, `{m['retrieval']['decoding']}` decoding |"]


def model_card(m: dict) -> str:
    """README.md of the bundle whose manifest is ``m`` (see the module docstring)."""
    s, ev = m["strategy"], m["evaluation"]
    k = m["retrieval"]["top_k"]
    lines = [f"# {s['label']} on {m['dataset']}: a distrag pipeline", "",
             f"A retrieval-augmented QA pipeline trained with **{s['label']}** (`{s['key']}`: {s['summary']}). "
             "This folder is enough to answer questions with it (`distrag ask`, `distrag predict`, or as an MLflow "
             "model); `bundle.json` lists every file with its size and sha256, checked before anything loads.", "",
             "| | |", "|---|---|", f"| Strategy | {s['label']} (`{s['key']}`) |",
             f"| Data | `{m['dataset']}`, scored on the {ev['split']} split ({ev['n_questions']} questions) |",
             *_parts(m), "",
             f"## Quality ({ev['split']} split, {ev['n_questions']} questions, %)", "",
             "| metric | value | 95% interval |", "|---|---|---|", *_quality_rows(ev, k), "",
             "EM's interval is Wilson's (as in the report's table); F1's is a bootstrap of the per-question mean "
             "(10,000 resamples).", "",
             "## Cost (the whole run, from the cost ledger)", "", "| | |", "|---|---|", *_cost_rows(ev["costs"]), "",
             "## Use it", "", "```bash",
             'distrag ask THIS_FOLDER "your question"                        # the answer and the top-k passages',
             "distrag predict THIS_FOLDER --questions q.jsonl --out answers.jsonl   # scored when q.jsonl has answers"]
    if ev.get("run_id"):
        lines += [f"mlflow models serve -m runs:/{ev['run_id']}/pipeline --env-manager local -p 5001 -t 300",
                  "curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' "
                  "-d '{\"inputs\": [\"your question\"]}'"]
    lines += ["```", ""]
    gen = m["generator"]
    if gen["adapter"]:
        files = gen.get("base_files") or {}  # where the base resolved when the bundle was written
        where = repr(files.get("path") or gen["base"])
        gguf = files.get("gguf_file") or gen.get("gguf_file")
        lines += [f"The adapter alone, with transformers and peft (the base `{gen['base']}` as it resolved where this "
                  "bundle was written):", "", "```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM",
                  f"base = AutoModelForCausalLM.from_pretrained({where}" + (f", gguf_file={gguf!r})" if gguf else ")"),
                  f"model = PeftModel.from_pretrained(base, 'THIS_FOLDER/{gen['adapter']}')", "```", ""]
    lines += ["## Where it came from", ""]
    if ev.get("run_id"):
        lines.append(f"- MLflow run `{ev['run_id']}` (experiment `{ev.get('experiment')}`, "
                     f"`{ev.get('tracking_uri')}`); the run's artifact `pipeline` is this bundle as an MLflow model.")
    if ev.get("group"):
        lines.append(f"- Compared with the other strategies of its group in the [report]({REPORT_FROM_BUNDLE}) "
                     f"(`distrag report --group {ev['group'][:8]}` writes it to `<output_dir>/report/`; the link "
                     "holds while this folder is in `<output_dir>/models/`).")
    lines.append(f"- Written by distrag {m['distrag_version']} on {m['created']}; the full configuration is "
                 f"`{m['config']}`.")
    return "\n".join(lines) + "\n"
