"""The ``vlkit`` command line: fit, validate, predict, list, config and data tools."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console

from vlkit.errors import VlkitError

console = Console()
err_console = Console(stderr=True)

OVERRIDES_HELP = "dotted overrides applied after the recipe, e.g. model.fusion.name=linear stages.0.lr=1e-4"


def _cmd_fit(args: argparse.Namespace) -> int:
    from vlkit.config import load_recipe
    from vlkit.training.fit import fit

    recipe = load_recipe(args.recipe, args.overrides)
    summary = fit(recipe, args.run_dir)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        _print_metrics(summary["val"], f"final validation ({summary['run_dir']})")
    return 0


def _print_metrics(metrics: dict[str, float], title: str) -> None:
    from rich.table import Table

    from vlkit.eval.metrics import METRICS

    if not metrics:
        console.print(f"{title}: no validation data in the recipe")
        return
    table = Table(title=title)
    for col in ("metric", "model", "majority baseline", "samples"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    if "val/loss" in metrics:
        table.add_row("loss", f"{metrics['val/loss']:.4f}", "", "")
    for key, value in metrics.items():
        if key.startswith("val/accuracy"):
            suffix = key.removeprefix("val/accuracy")
            table.add_row(f"accuracy{suffix or ' (overall)'}", f"{value:.3f}",
                          f"{metrics.get('val/baseline' + suffix, float('nan')):.3f}",
                          f"{int(metrics.get('val/count' + suffix, 0))}")
    for key, value in metrics.items():  # the other eval.metrics: val/<metric>[/<type>], val/baseline_<metric>...
        name, _, rest = key.removeprefix("val/").partition("/")
        if name not in METRICS or name == "exact_match":
            continue
        suffix = "/" + rest if rest else ""
        table.add_row(f"{name}{suffix or ' (overall)'}", f"{value:.3f}",
                      f"{metrics.get(f'val/baseline_{name}' + suffix, float('nan')):.3f}",
                      f"{int(metrics.get('val/count' + suffix, 0))}")
    console.print(table)


def _cmd_validate(args: argparse.Namespace) -> int:
    from vlkit.training.fit import evaluate, load_run

    recipe, model = load_run(args.run_dir)
    metrics = evaluate(recipe, model)
    _print_metrics(metrics, f"validation of {args.run_dir}")
    if args.out:
        Path(args.out).write_text(json.dumps(metrics, indent=2))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from PIL import Image

    from vlkit.errors import DataError
    from vlkit.generation import answer as answers_of
    from vlkit.generation import from_arguments
    from vlkit.io.pretrained import from_pretrained

    options = from_arguments(args)  # checked before the model loads
    model = from_pretrained(args.run_dir)
    if args.input:
        lines = Path(args.input).read_text().splitlines()
        items = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                item["question"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(f"{args.input}:{n}: expected a JSON object with 'question' (and optional "
                                f"'image'), got {line[:80]!r} ({exc})") from None
            items.append(item)
        folder = Path(args.input).parent
        for item in items:  # image paths relative to the JSON lines file (else to the working directory)
            image = item.get("image")
            if isinstance(image, str) and not Path(image).is_absolute() and (folder / image).exists():
                item["image"] = str(folder / image)
    elif args.question:
        items = [{"image": args.image, "question": args.question}]
    else:
        raise DataError("give --input FILE.jsonl or --question TEXT (with --image PATH)")
    out = open(args.out, "w") if args.out else sys.stdout  # noqa: SIM115
    try:
        for start in range(0, len(items), args.batch_size):
            chunk = items[start:start + args.batch_size]
            images = []
            for item in chunk:
                path = item.get("image")
                if path is None:
                    images.append(None)
                    continue
                try:
                    images.append(Image.open(path).convert("RGB"))
                except (OSError, ValueError) as exc:
                    raise DataError(f"cannot read image {path!r}: {exc}") from None
            answers = answers_of(model, images, [i["question"] for i in chunk], options, batch_size=len(chunk))
            for item, answer in zip(chunk, answers):
                out.write(json.dumps({**item, "answer": answer}) + "\n")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from vlkit.reference import describe, summary
    from vlkit.registry import REGISTRIES

    if args.name:  # one part's reference: imports that part (and torch), nothing else
        if not args.kind:
            raise VlkitError("name the kind too, e.g. `vlkit list encoders clip`")
        print(describe(REGISTRIES[args.kind], args.name, width=max(60, console.width - 2)), end="")
        return 0
    kinds = [args.kind] if args.kind else list(REGISTRIES)
    for kind in kinds:  # names and summaries come from the sources and the plugin metadata: no imports
        registry = REGISTRIES[kind]
        if args.check:
            registry.load_all()
        console.print(f"[bold]{kind}[/]")
        index = registry.index()
        for name in registry.names():
            info = index.get(name)
            doc = summary(info.doc) if info is not None else ""
            console.print(f"  {name:<16} {doc}", highlight=False, markup=False, soft_wrap=True)
        for name, cause in registry.failures().items():
            console.print(f"  {name:<16} (installed but failed to load: {cause})", highlight=False, markup=False,
                          soft_wrap=True)
    if not args.name and args.kind:
        console.print(f"details of one part: vlkit list {args.kind} NAME", style="dim", highlight=False)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from vlkit.config import load_recipe
    from vlkit.io.init import InitUnavailable, check_without_init

    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except InitUnavailable as exc:  # a hub `model.init` offline: check the rest, say what was not checked
        text, note = check_without_init(exc)
        print(text, end="")
        err_console.print(f"[bold yellow]note:[/] {note}", highlight=False, soft_wrap=True)
        return 0
    print(recipe.to_yaml(), end="")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from vlkit.sweep import describe, load_sweep, run_sweep

    sweep = load_sweep(args.sweep, out=args.out)  # validates every cell's recipe before anything runs
    if args.dry_run:
        describe(sweep, console)
        return 0
    try:
        report = run_sweep(sweep, jobs=args.jobs, console=console)
    except KeyboardInterrupt:
        err_console.print(f"sweep interrupted; partial results in {sweep.out}. Run the same command again to "
                          "complete the missing runs.")
        return 130
    files = ", ".join(str(f) for f in report.files.values())
    console.print(f"results: {files}", highlight=False)
    if report.failed:
        err_console.print(f"[bold red]{len(report.failed)} of {len(report.results)} runs did not finish[/] "
                          f"(see {report.files['md']} and the runs' .log files)", highlight=False)
        return 1
    return 0


def _cmd_data_demo(args: argparse.Namespace) -> int:
    from vlkit.data.demo import build_demo, existing_demo

    kwargs = {k: v for k, v in (("train_scenes", args.train_scenes), ("val_scenes", args.val_scenes)) if v}
    index = None if args.overwrite else existing_demo(args.out, seed=args.seed, **kwargs)
    if index is not None:
        console.print(f"{args.out} already holds this demo dataset; reusing it (--overwrite rebuilds it)")
        return 0
    index = build_demo(args.out, seed=args.seed, overwrite=args.overwrite, **kwargs)
    splits = ", ".join(f"{s}: {v['samples']} samples" for s, v in index["splits"].items())
    console.print(f"demo dataset written to {args.out} ({splits})")
    return 0


def _cmd_data_llava(args: argparse.Namespace) -> int:
    from vlkit.data.llava import convert_llava

    index = convert_llava(args.json, args.image_dir, args.out, val_fraction=args.val_fraction,
                          overwrite=args.overwrite, strict=args.strict)
    splits = ", ".join(f"{s}: {v['samples']} samples" for s, v in index["splits"].items())
    console.print(f"shards written to {args.out} ({splits})")
    return 0


def _cmd_data_inspect(args: argparse.Namespace) -> int:
    from vlkit.config import load_recipe
    from vlkit.data.inspect import inspect_recipe
    from vlkit.model import build_model

    recipe = load_recipe(args.recipe, args.overrides)
    inspect_recipe(recipe, build_model(recipe), split=args.split, n=args.n, stage=args.stage, console=console)
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from vlkit.data.check import check_recipe, check_urls, print_reports, url_processor

    if args.target.endswith((".yaml", ".yml")) and Path(args.target).is_file():
        from vlkit.config import load_recipe
        from vlkit.model import build_model

        recipe = load_recipe(args.target, args.overrides)
        reports = check_recipe(recipe, build_model(recipe))
    else:
        processor = url_processor(args.tokenizer, args.image_tokens, args.max_length) if args.tokenizer else None
        reports = check_urls(args.target, processor)
    return 0 if print_reports(reports, console) else 1


def _cmd_cache_features(args: argparse.Namespace) -> int:
    from vlkit.config import load_recipe
    from vlkit.data.feature_cache import build_cache, cache_device, cache_precision
    from vlkit.model import build_model
    from vlkit.registry import DATASETS

    recipe = load_recipe(args.recipe, args.overrides)
    out = args.out or recipe.data.feature_cache
    if not out:
        raise VlkitError(f"{args.recipe}: no output folder: pass --out DIR (or set data.feature_cache)")
    device = cache_device(args.device, recipe.trainer.accelerator)
    # the precisions of the stages that read the cache (their encoders frozen); else trainer.precision
    frozen = [s for s in recipe.stages if not any(p == "encoders" or p.startswith("encoders.") for p in
                                                  [*s.trainable, *getattr(s.lora, "parts", [])])]
    precisions = list(dict.fromkeys(cache_precision(s.precision or recipe.trainer.precision) for s in frozen))
    model = build_model(recipe)
    shards = DATASETS.build(recipe.data.train, "data.train").shards
    for precision in precisions or [cache_precision(recipe.trainer.precision)]:
        reader = build_cache(recipe, model, shards, out, batch_size=args.batch_size, precision=precision,
                             device=device)
        console.print(f"cached the streams of {len(shards)} training shard(s) in {reader.folder} (on {device}, "
                      f"precision {precision}); train from them with `data.feature_cache={out}` in the stages "
                      "whose encoders are frozen", highlight=False)
    return 0


def _cmd_mix_weights(args: argparse.Namespace) -> int:
    from vlkit.training.mix import mix_weights

    out = mix_weights(args.a, args.b, args.beta, args.out, only=args.only, overwrite=args.overwrite)
    parts = f" (only {', '.join(args.only)}; the rest copied from A)" if args.only else ""
    console.print(f"wrote {out}: {args.beta:g} * A + {1 - args.beta:g} * B{parts}", highlight=False, soft_wrap=True)
    return 0


def _cmd_new(args: argparse.Namespace) -> int:
    from vlkit.scaffold import new_part

    folder = new_part(args.kind, args.name, args.out)
    console.print(f"wrote the plugin package {folder} ({args.kind} {args.name!r}). Next:\n"
                  f"  pip install -e {folder}\n  cd {folder} && python -m pytest tests -q\n"
                  f"  vlkit data demo --out {folder}/data/demo && vlkit fit {folder}/demo.yaml",
                  highlight=False, markup=False, soft_wrap=True)
    return 0


def _cmd_merge_lora(args: argparse.Namespace) -> int:
    from vlkit.export.lora import export_lora

    files = export_lora(args.run_dir, args.out, overwrite=args.overwrite)
    lines = [f"merged model (vlkit.from_pretrained): {files['model']}"]
    if "adapter" in files:
        lines.append(f"LLM adapters in peft format: {files['adapter']} (base LLM: {files['llm']})")
    console.print("\n".join(lines), highlight=False, soft_wrap=True)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from vlkit.eval.lmms import run_eval

    tasks = [t for t in args.tasks.split(",") if t]
    results = run_eval(args.model, tasks, limit=args.limit, out=args.out, include_path=args.include_path,
                       batch_size=args.batch_size, max_new_tokens=args.max_new_tokens)
    if results:
        from lmms_eval.utils import make_table

        console.print(make_table(results), highlight=False, soft_wrap=True)
        if args.out:
            console.print(f"results: {Path(args.out) / 'results.json'}, {Path(args.out) / 'results.md'}",
                          highlight=False)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from vlkit.export import export

    out = export(args.source, args.out, args.format, overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    how = ("vlkit.from_pretrained" if args.format == "vlkit"
           else "transformers' AutoModelForImageTextToText / AutoProcessor")
    console.print(f"wrote {out} (load it with {how})", highlight=False, soft_wrap=True)
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from vlkit.chat import run
    from vlkit.generation import from_arguments

    return run(args.model, image=args.image, options=from_arguments(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    from vlkit.serve import serve

    return serve(args.model, host=args.host, port=args.port, name=args.name)


def _beta(value: str) -> float:
    try:
        beta = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not 0.0 <= beta <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {beta:g}")
    return beta


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlkit", description="Build and train vision-language models from "
                                     "swappable parts described by YAML recipes.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="train a recipe (all its stages); rerun on the same run folder to resume",
                       description="Train every stage of RECIPE. The run folder holds the resolved recipe, "
                       "per-stage checkpoints, metrics.csv and summary.json; running again resumes.")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--run-dir", default=None, help="run folder (default: runs/<recipe name>)")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("validate", help="evaluate a trained run on its recipe's validation data",
                       description="Loss and exact-match accuracy (overall and per question type) of the latest "
                       "checkpoint in RUN_DIR, next to the majority-answer baseline.")
    p.add_argument("run_dir", help="run folder written by vlkit fit")
    p.add_argument("--out", help="also write the metrics as JSON to this file")
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("predict", help="answer questions about images with a trained run (JSON lines out)",
                       description="Answer questions with MODEL: a run folder (its latest checkpoint), a stage "
                       "checkpoint, a saved or LLaVA-exported folder. Input: --input "
                       "FILE.jsonl with one {\"image\": path, \"question\": text} per line (image paths relative "
                       "to the file), or --image/--question. `vlkit data demo` writes samples/questions.jsonl. "
                       "Generation flags as in `vlkit chat` / `vlkit serve` (default greedy).")
    p.add_argument("run_dir", metavar="model", help="run folder, stage checkpoint, saved model or LLaVA folder")
    p.add_argument("--input", help="JSON lines file of {image, question}")
    p.add_argument("--image", help="one image file (with --question)")
    p.add_argument("--question", help="one question")
    p.add_argument("--out", help="output JSON lines file (default: stdout)")
    p.add_argument("--batch-size", type=int, default=16)
    from vlkit.generation import add_arguments as add_generation_arguments  # light: no torch

    add_generation_arguments(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("list", help="list registered encoders, fusions, llms and datasets (plugins included)",
                       description="Without NAME: the registered parts of each kind with a one-line description "
                       "(read from the sources, nothing is imported). With KIND NAME: that part's reference: "
                       "its description and every argument with type, default and documentation.")
    p.add_argument("kind", nargs="?", choices=["encoders", "fusions", "llms", "datasets", "objectives"])
    p.add_argument("name", nargs="?", help="a registered name (or module:Class) to describe")
    p.add_argument("--check", action="store_true", help="also import every part and plugin, reporting any that "
                   "fails to load")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("config", help="print the resolved, validated recipe (after base: and overrides)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("sweep", help="train a grid of recipe overrides x seeds (resumable); tabulate and plot",
                       description="Run every cell x seed of SWEEP (a YAML file naming a base recipe, a `grid:` "
                       "or `cells:` of dotted overrides, `seeds:` and `metrics:`) as its own `vlkit fit` process "
                       "in <out>/<cell>/seed<k>/. Finished runs are skipped, so rerunning completes an "
                       "interrupted sweep; a failed run is recorded and the others go on. Writes results.csv, "
                       "results.md (mean ± std over seeds) and results.png into the output folder.")
    p.add_argument("sweep", help="sweep YAML file")
    p.add_argument("--out", default=None, help="output folder (default: the sweep's `out:`, else "
                   "runs/<sweep name>/ next to the sweep file)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained in parallel processes (default 1)")
    p.add_argument("--dry-run", action="store_true", help="validate the sweep and list its runs without training")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("cache-features", help="run the recipe's encoders once over its training shards and store "
                       "their streams (for stages with frozen encoders)",
                       description="Encode every training image of RECIPE with its encoders (as the recipe builds "
                       "them) and store the streams in DIR/<fingerprint>/. Training with data.feature_cache=DIR "
                       "then reads them instead of pixels in every stage whose encoders are frozen. The "
                       "fingerprint covers the cache format, the encoder sections, their weights, image size, views, "
                       "precision and the versions of torch and of the encoders' libraries, and each read checks "
                       "the image's hash, so a changed encoder, library or image never gets stale features. "
                       "`vlkit fit` builds missing caches itself; this command builds them ahead of time.")
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--out", default=None, help="cache folder (default: the recipe's data.feature_cache)")
    p.add_argument("--batch-size", type=int, default=64, help="images per encoder batch (default 64)")
    p.add_argument("--device", default=None, help="where to encode: cpu, cuda, cuda:1 (default: where the recipe "
                   "trains, trainer.accelerator: cuda for gpu, cpu for cpu); encoded in the precision of the "
                   "stages that read the cache (bf16-mixed: under bf16 autocast)")
    p.set_defaults(func=_cmd_cache_features)

    data = sub.add_parser("data", help="build datasets: the offline demo, or shards from LLaVA-format JSON")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    p = dsub.add_parser("demo", help="build the offline demo dataset (shapes VQA + digits) and its tokenizer")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--train-scenes", type=int, default=None, help="number of training scenes")
    p.add_argument("--val-scenes", type=int, default=None, help="number of validation scenes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.set_defaults(func=_cmd_data_demo)
    p = dsub.add_parser("from-llava", help="convert LLaVA-format JSON + image folder into webdataset shards")
    p.add_argument("json", help="LLaVA JSON file: a list of {id, image, conversations}")
    p.add_argument("image_dir", help="folder the 'image' paths are relative to")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--val-fraction", type=float, default=0.0, help="fraction of samples held out as val")
    p.add_argument("--strict", action="store_true", help="fail on the first bad entry instead of skipping it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    p.set_defaults(func=_cmd_data_llava)
    p = dsub.add_parser("inspect", help="print samples as the model sees them: tokens (trained ones highlighted), "
                        "visual tokens per image, truncation")
    p.add_argument("recipe", help="recipe YAML")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--split", choices=["train", "val"], default="train", help="which data (default train)")
    p.add_argument("-n", type=int, default=3, help="number of samples (default 3)")
    p.add_argument("--stage", default=None, help="training stage whose data to show (default the first)")
    p.set_defaults(func=_cmd_data_inspect)
    p = dsub.add_parser("check", help="verify shards before a long run: readable, sample counts, images decode, "
                        "conversations tokenize within max_length with trained tokens")
    p.add_argument("target", help="recipe YAML (checks its datasets) or shard urls, e.g. 'data/train-*.tar'")
    p.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    p.add_argument("--tokenizer", default=None, help="with urls: tokenizer folder or hub id to check tokenization")
    p.add_argument("--image-tokens", type=int, default=1, help="with urls: visual tokens per image (default 1)")
    p.add_argument("--max-length", type=int, default=512, help="with urls: longest sample in tokens (default 512)")
    p.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("new", help="write a plugin package for a new encoder, fusion, llm or dataset",
                       description="Write a plugin package for a new part: pyproject.toml with its entry point, "
                       "the part (Args and interface filled in), a test, a demo recipe that trains a tiny VLM "
                       "with it, and a README. It installs (pip install -e DIR), passes its test and trains as "
                       "written; see docs/parts.md for the interfaces.")
    p.add_argument("kind", choices=["encoder", "fusion", "llm", "dataset"])
    p.add_argument("name", help="the part's registered name (lower case, digits, _), e.g. my_encoder")
    p.add_argument("--out", default=None, help="output folder (default: ./NAME)")
    p.set_defaults(func=_cmd_new)

    p = sub.add_parser("mix-weights", help="interpolate two checkpoints of one architecture: beta*A + (1-beta)*B",
                       description="Write theta = beta * A + (1 - beta) * B (SPHINX weight mixing). A and B: vlkit "
                       "run folders, stage checkpoints (stage*/last), Hugging Face model folders (single or "
                       "sharded safetensors) or .safetensors files with the same tensors. The output mirrors A's "
                       "layout (a run folder stays usable by `vlkit validate`/`predict`). Floats are mixed in "
                       "float32 and keep their dtype; integer tensors must be equal.")
    p.add_argument("a", help="checkpoint A (weight beta)")
    p.add_argument("b", help="checkpoint B (weight 1 - beta)")
    p.add_argument("--beta", type=_beta, default=0.5, help="weight of A, in [0, 1] (default 0.5)")
    p.add_argument("--out", required=True, help="output folder (or .safetensors file when A is a file)")
    p.add_argument("--only", action="append", default=None, metavar="PART",
                   help="mix only this part (llm, fusion, encoders, encoders.<key>, or any key prefix); other "
                   "tensors are copied from A. Repeat for several parts")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_mix_weights)
    p = sub.add_parser("merge-lora", help="fold a run's LoRA adapters into its weights; also write them in peft format",
                       description="Write OUT/model (the latest checkpoint of RUN_DIR with its LoRA adapters merged, "
                       "a saved model for vlkit.from_pretrained) and, when the LLM has adapters, OUT/llm (the base "
                       "LLM) and OUT/llm-adapter (adapter_config.json + adapter_model.safetensors for "
                       "peft.PeftModel.from_pretrained).")
    p.add_argument("run_dir", help="run folder written by vlkit fit")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_merge_lora)

    p = sub.add_parser("eval", help="run lmms-eval benchmarks on a run folder or saved model (pip install vlkit[eval])",
                       description="Evaluate MODEL (a run folder or a saved model) on lmms-eval TASKS in-process, "
                       "through the `vlkit` lmms-eval model. Writes OUT/results.json (lmms-eval's results) and "
                       "OUT/results.md (its table).")
    p.add_argument("model", help="run folder written by vlkit fit, or a saved model folder")
    p.add_argument("--tasks", required=True, help="comma-separated lmms-eval task names")
    p.add_argument("--limit", type=float, default=None, help="samples per task (a fraction if < 1)")
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    p.add_argument("--include-path", default=None, help="folder of extra (local) lmms-eval task YAMLs")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32, help="default when a task sets none")
    p.set_defaults(func=_cmd_eval)
    _add_model_io_commands(sub)
    return parser


def _add_model_io_commands(sub: argparse._SubParsersAction) -> None:
    """``export``, ``chat`` and ``serve``."""
    from vlkit.generation import add_arguments as add_generation_arguments  # light: no torch

    p = sub.add_parser("export", help="write a trained model as a self-contained folder (vlkit or LLaVA format)",
                       description="Write SOURCE (a run folder: its latest checkpoint; a stage checkpoint; a saved "
                       "model) to OUT: --format vlkit (default; every architecture; vlkit.from_pretrained) or "
                       "--format llava (transformers' LlavaForConditionalGeneration + LlavaProcessor, for one "
                       "CLIP ViT + linear/mlp2x_gelu projector + Hugging Face causal LM).")
    p.add_argument("source", help="run folder, stage checkpoint or saved model")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["vlkit", "llava"], default="vlkit")
    p.add_argument("--max-shard-size", default="5GB", help="weights beyond this are sharded (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("chat", help="multi-turn terminal chat with a model (/image PATH, /reset, /exit)",
                       description="Chat with MODEL (run folder, stage checkpoint, saved or LLaVA-exported "
                       "folder); answers stream as they are generated.")
    p.add_argument("model", help="run folder, stage checkpoint, saved model or LLaVA folder")
    p.add_argument("--image", help="attach this image to the conversation")
    add_generation_arguments(p)
    p.set_defaults(func=_cmd_chat, max_new_tokens=256)

    p = sub.add_parser("serve", help="OpenAI-compatible chat server (POST /v1/chat/completions, GET /v1/models)",
                       description="Serve MODEL over an OpenAI-compatible HTTP API (needs pip install "
                       "'vlkit[serve]'). Binds 127.0.0.1 unless --host says otherwise.")
    p.add_argument("model", help="run folder, stage checkpoint, saved model or LLaVA folder")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--name", default=None, help="model id in the API (default: the folder's name)")
    p.set_defaults(func=_cmd_serve)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """vlkit's own warnings (e.g. a plugin that failed to load) as one line, without source context."""
    if category.__module__.startswith("vlkit."):
        return f"warning: {message}\n"
    return _default_format_warning(message, category, filename, lineno, line)


_default_format_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may also follow options: `vlkit fit R --run-dir D a.b=c`
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except VlkitError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
