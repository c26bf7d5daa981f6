"""``distrag plan`` on the terminal and on disk: the projection table (rich) and the plot (search device-hours
and memory per device of every strategy), from a :class:`~distrag.costs.plan.Plan`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from distrag.reporting.plots import _colors, _pyplot, save_png

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from distrag.costs.plan import Plan, PlanTarget


def plan_heading(p: Plan) -> str:
    """What was projected, in one paragraph."""
    t = p.target
    m, n = t.grid
    return (f"{t.generator} ({'QLoRA' if t.qlora else 'LoRA'} r={t.lora_r}) + {t.embedder}; corpus {t.corpus:,} "
            f"passages, {t.questions:,} questions x {t.epochs:g} epoch(s), k={t.k}, {t.batch_size} questions/step; "
            f"LR grid {m} x {n}; {t.n_gpus} x {p.gpu.name} ({p.gpu.peak_flops / 1e12:.0f} TFLOP/s bf16 each) at "
            f"MFU {t.mfu:.2f}; index refresh every {t.refresh_every or '-'} steps")


def plan_rows(p: Plan) -> list[list[str]]:
    """The table's cells, one row per strategy."""
    out = []
    for r in p.rows:
        out.append([r.label, str(r.runs), f"{r.train_flops:.3g}", f"{r.search_flops:.3g}",
                    f"{r.wall_h:,.1f}", f"{r.device_hours:,.1f}",
                    f"{r.memory_gb:.1f}" + ("" if r.fits else f" (> {p.gpu.memory_gb:g})")])
    return out


HEADERS = ["Strategy", "LR-search runs", "FLOPs / run", "Search FLOPs", "Search wall-clock (h)",
           "Search device-hours", "Memory / device (GB)"]


def index_line(p: Plan) -> str:
    """The index rank's sizing."""
    t = p.target
    staleness = t.staleness or t.refresh_every
    if not staleness:
        return (f"Index: {t.corpus:,} passages, {p.index_memory_gb:.1f} GB of flat float32 vectors; passage vectors "
                f"frozen (no refresh). One GPU encodes {p.passages_per_s_per_gpu:,.0f} passages/s.")
    return (f"Index rank: a joint step takes {p.step_s:.2f} s; a staleness of {staleness} steps needs the corpus "
            f"re-embedded in {staleness * p.step_s:,.0f} s = {p.passages_per_s_needed:,.0f} passages/s; one "
            f"{p.gpu.name} encodes {p.passages_per_s_per_gpu:,.0f}/s -> {p.index_gpus} index GPU(s); "
            f"{p.index_memory_gb:.1f} GB of flat float32 vectors.")


def print_plan(p: Plan, console=None) -> None:
    """The projection as a rich table, with what was assumed and the index rank's sizing."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=150)
    t = Table(title="distrag plan", title_justify="left", caption=plan_heading(p), caption_justify="left")
    for h in HEADERS:
        t.add_column(h, justify="left" if h == "Strategy" else "right")
    for cells in plan_rows(p):
        t.add_row(*cells)
    console.print(t)
    console.print(index_line(p))


def plan_figure(p: Plan) -> Figure:
    """Two panels: each strategy's search device-hours (log scale) and its memory per device against the
    GPU's memory."""
    plt = _pyplot()
    rows = [r for r in p.rows if r.runs]
    colors = _colors(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = [r.label for r in rows]
    a.barh(labels, [max(r.device_hours, 1e-6) for r in rows], color=colors)
    a.set_xscale("log")
    a.set_xlabel(f"device-hours of the LR search ({p.target.n_gpus} x {p.gpu.name}, MFU {p.target.mfu:.2f})")
    a.invert_yaxis()
    b.barh(labels, [r.memory_gb for r in rows], color=colors)
    b.axvline(p.gpu.memory_gb, color="black", linestyle="--", linewidth=1)
    b.text(p.gpu.memory_gb, -0.6, f" {p.gpu.name} {p.gpu.memory_gb:g} GB", fontsize=8, va="bottom")
    b.set_xlabel("memory per trainer device (GB)")
    b.invert_yaxis()
    fig.suptitle("distrag plan: " + p.target.generator + " + " + p.target.embedder, fontsize=10)
    fig.tight_layout()
    return fig


def write_plan_plot(p: Plan, path: Path) -> Path:
    """:func:`plan_figure` as a PNG at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(plan_figure(p), path)
    return path


# ----------------------------------------------------------------------------------------------
# the `distrag plan` command: its arguments, defaults from the experiment config


def add_plan_args(p) -> None:
    """``distrag plan``'s own flags (unset ones come from ``--config`` and its overrides)."""
    p.add_argument("--generator", help="model id / folder / .gguf, or a size: 135m, 1b, 3b, 8b, 70b "
                                       "(default: generator.model)")
    p.add_argument("--embedder", help="model id / folder, or a size: 22m, 110m, 335m (default: embedder.model)")
    p.add_argument("--lora-r", type=int, help="LoRA rank (default: generator.lora.r)")
    p.add_argument("--qlora", action="store_true", help="4-bit base weights (QLoRA)")
    p.add_argument("--corpus", type=int, default=100_000, help="passages in the corpus")
    p.add_argument("--questions", type=int, default=10_000, help="training questions")
    p.add_argument("--epochs", type=float, help="passes over the questions per phase (default: train.epochs)")
    p.add_argument("--k", type=int, help="passages per question (default: train.train_k or retrieval.top_k)")
    p.add_argument("--batch-size", type=int, help="questions per optimizer step (default: train.batch_size)")
    p.add_argument("--grid", help="learning rates searched, MxN (default: len(sweep.lr_embedder) x "
                                  "len(sweep.lr_generator))")
    p.add_argument("--gpu", default="A100", help="A10, L4, A100, H100 or H200")
    p.add_argument("--gpus", type=int, default=1, help="GPUs of the job")
    p.add_argument("--mfu", type=float, help="model-FLOPs utilisation (default: calibrated, see README)")
    p.add_argument("--refresh-every", type=int, help="steps between index refreshes (default: train.refresh_every)")
    p.add_argument("--staleness", type=int, help="index staleness target in steps (default: the refresh interval)")
    p.add_argument("--passage-tokens", type=int, default=160, help="tokens per passage")
    p.add_argument("--plot", help="write the plot here (default: <output_dir>/plan.png)")


def target_from(args, cfg) -> PlanTarget:
    """The :class:`PlanTarget` of the command line, unset flags read from the experiment config."""
    from distrag.costs.plan import DEFAULT_MFU, PlanTarget
    from distrag.errors import ConfigError

    grid = (len(cfg.sweep.lr_embedder), len(cfg.sweep.lr_generator))
    if args.grid:
        try:
            m, n = (int(x) for x in args.grid.lower().split("x"))
        except ValueError:
            raise ConfigError([("--grid", f"expected MxN, e.g. 3x3; got {args.grid!r}")]) from None
        grid = (m, n)

    def pick(value, default):
        return default if value is None else value

    return PlanTarget(
        generator=args.generator or cfg.generator.model, embedder=args.embedder or cfg.embedder.model,
        lora_r=pick(args.lora_r, cfg.generator.lora.r), lora_targets=tuple(cfg.generator.lora.target_modules),
        qlora=args.qlora, corpus=args.corpus, questions=args.questions, epochs=pick(args.epochs, cfg.train.epochs),
        k=pick(args.k, cfg.train.train_k or cfg.retrieval.top_k),
        batch_size=pick(args.batch_size, cfg.train.batch_size),
        grid=grid, gpu=args.gpu, n_gpus=args.gpus, mfu=pick(args.mfu, DEFAULT_MFU),
        refresh_every=pick(args.refresh_every, cfg.train.refresh_every), staleness=args.staleness,
        passage_tokens=args.passage_tokens, gradient_checkpointing=cfg.generator.gradient_checkpointing,
        pair_micro_batch=cfg.train.pair_micro_batch)


def run_plan(args, cfg) -> int:
    """``distrag plan``: print the projection and write its plot."""
    from distrag.costs.plan import plan

    p = plan(target_from(args, cfg))
    print_plan(p)
    out = write_plan_plot(p, Path(args.plot) if args.plot else Path(cfg.output_dir) / "plan.png")
    print(f"plot: {out}")
    return 0
