"""The craft-deploy command line: parse options, build a config, call craft_deploy.<stage>.run(cfg)."""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import sys
from importlib import metadata
from typing import Any

import click
from click._utils import UNSET
from click.core import ParameterSource

from craft_deploy import EXIT_INTERRUPTED, CraftError, __version__
from craft_deploy.config import (
    EDGE_DEVICES,
    EXPORT_PRECISIONS,
    TUNECOMP_PRUNE_SCHEDULES,
    AnalyzeConfig,
    BenchConfig,
    CompressConfig,
    ExportConfig,
    FinetuneConfig,
)

EXIT_CODES_HELP = (
    "Exit codes: 0 success (a paired gate left undecided included); 2 bad usage or bad input (a flag value, a bundle "
    "or file refused); 3 regression gate failed; 4 an artifact failed its verification (export or engine disagrees "
    "with PyTorch); 130 interrupted."
)
PLUGIN_GROUP = "craft_deploy.plugins"
PLUGIN_ENV = "CRAFT_DEPLOY_PLUGINS"


def _guard(fn):
    """Turn a CraftError into a one-line message and its exit code (2 bad input, 4 failed verification), without a
    traceback; Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CraftError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.secho(
                "interrupted; nothing half-written is left in --out (finetune: continue with --resume OUT; study: run "
                "the same command again, finished cells are kept)",
                err=True,
            )
            sys.exit(EXIT_INTERRUPTED)

    return wrapper


class RegistryChoice(click.Choice):
    """A choice among the names of a registry (calibrators, pruning scores, optimizers, backends), read when the
    command line is parsed or its help is shown, so that a class registered by a plugin is accepted and listed."""

    def __init__(self, where: str):
        self.where = where  # "module:TABLE", imported only when the choices are needed
        super().__init__([])

    @property
    def choices(self):  # type: ignore[override]
        module, table = self.where.split(":")
        return tuple(getattr(importlib.import_module(module), table))

    @choices.setter
    def choices(self, value) -> None:  # click.Choice.__init__ assigns it; the registry is the source
        pass


class RegistryHelpOption(click.Option):
    """An option whose help lists the registered entries' own help lines (export targets), read when help is shown."""

    def __init__(self, *args, registry: str, lead: str = "", **kw):
        self.registry, self.lead = registry, lead  # "module:TABLE" of objects with a `help` line
        super().__init__(*args, **kw)

    def get_help_record(self, ctx: click.Context):
        module, table = self.registry.split(":")
        entries = getattr(importlib.import_module(module), table).values()
        self.help = self.lead + "; ".join(e.help for e in entries) + "."
        return super().get_help_record(ctx)


def _method_option(flag, default: Any) -> click.Option:
    """The click option of one method flag (craft_deploy.toolkit.flags.Flag)."""
    kw: dict[str, Any] = {"help": flag.help}
    if flag.kind == "flag":
        return click.Option([flag.option], is_flag=True, **kw)
    if flag.kind == "switch":
        return click.Option([f"{flag.option}/--no-{flag.name}"], default=default, show_default=True, **kw)
    if isinstance(flag.choices, str):
        kw["type"] = RegistryChoice(flag.choices)
    elif flag.choices:
        kw["type"] = click.Choice(flag.choices)
    elif flag.kind in (int, float):
        kw["type"] = flag.kind
    if default is not None:
        kw.update(default=default, show_default=True)
    return click.Option([flag.option], **kw)


class MethodsCommand(click.Command):
    """A command whose options include every registered compression method's flags, read from the registry when
    the command line is parsed or its help is shown: a method registered by a plugin brings its own options."""

    _generated: dict[tuple, list[click.Option]] = {}

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        from craft_deploy.toolkit.registry import method_flags

        flags = method_flags()
        key = tuple((k, id(f)) for k, (f, _) in flags.items())
        if key not in self._generated:
            self._generated[key] = [_method_option(f, cls.flag_default(f)) for f, cls in flags.values()]
        return [*self._generated[key], *super().get_params(ctx)]


class _FieldDefault:
    """An option default that is a config dataclass field's default, looked up when the command line is parsed or its
    help shown (so configs that live in stage modules are imported only then)."""

    def __init__(self, configs: tuple[str | type, ...], name: str, fallback: Any):
        self.configs, self.name, self.fallback = configs, name, fallback  # name: the config field

    def resolve(self) -> Any:
        for config in self.configs:
            if isinstance(config, str):
                module, cls = config.split(":")
                config = getattr(importlib.import_module(module), cls)
            field = next((f for f in dataclasses.fields(config) if f.name == self.name), None)
            if field is not None and field.default is not dataclasses.MISSING and not isinstance(field.default, tuple):
                return self.fallback if field.default is None else field.default
        return self.fallback


class _ConfigOption(click.Option):
    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        value = super().get_default(ctx, call=call)
        return value.resolve() if isinstance(value, _FieldDefault) else value


def _config_option(cls: type[click.Option]) -> type[click.Option]:
    """`cls` taking its default from a config field (an option class of its own, such as RegistryHelpOption, kept)."""
    return _ConfigOption if cls is click.Option else type(f"Config{cls.__name__}", (_ConfigOption, cls), {})


def defaults_from(*configs: str | type, **fields: str):
    """Command decorator: every option that sets no default of its own takes the default of the config field of its
    name (`fields` maps an option to a field of another name), from the first of `configs` (classes, or "module:Class")
    that has it, so the CLI never repeats a default."""

    def deco(cmd: click.Command) -> click.Command:
        for param in cmd.params:
            if isinstance(param, click.Option) and param.default in (None, UNSET):
                param.default = _FieldDefault(configs, fields.get(param.name, param.name), param.default)
                param.__class__ = _config_option(type(param))
        return cmd

    return deco


def load_plugins() -> list[str]:
    """Import third-party modules that register calibrators, pruning scores, methods, optimizers or backends: every
    entry point in the `craft_deploy.plugins` group, and the comma-separated modules in $CRAFT_DEPLOY_PLUGINS."""
    loaded = []
    for ep in metadata.entry_points(group=PLUGIN_GROUP):
        ep.load()
        loaded.append(ep.value)
    for name in filter(None, (s.strip() for s in os.environ.get(PLUGIN_ENV, "").split(","))):
        try:
            importlib.import_module(name)
        except ImportError as e:
            click.secho(f"error: ${PLUGIN_ENV} names {name!r}, which cannot be imported ({e})", fg="red", err=True)
            sys.exit(2)
        loaded.append(name)
    return loaded


def _split(values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(p for v in values for p in v.split(",") if p)


out_option = click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
overwrite_option = click.option("--overwrite", is_flag=True, help="Replace a non-empty --out.")
data_root_option = click.option(
    "--data-root", type=click.Path(), default=None, help="Where the dataset lives or is downloaded to."
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="craft-deploy")
def main() -> None:
    """Compression-aware fine-tuning, one-shot compression, export and benchmarking of timm vision models.

    The stages chain through directories: finetune -> compress -> export -> bench. Plugins (modules that register
    calibrators, pruning scores, methods, optimizers or backends) load from the `craft_deploy.plugins` entry point
    group and from $CRAFT_DEPLOY_PLUGINS (comma-separated module names).
    """
    load_plugins()


@defaults_from(FinetuneConfig)
@main.command()
@click.option("--model", show_default=True, help="Any timm model name.")
@click.option(
    "--pretrained/--no-pretrained",
    show_default=True,
    help="Pretrained weights (bundled for tf_efficientnet_lite0/1/2, timm's hub otherwise).",
)
@click.option("--checkpoint", type=click.Path(dir_okay=False), help="Local .safetensors/.pth state dict to start from.")
@click.option(
    "--data",
    show_default=True,
    help="fashion-mnist, digits, cifar10, cifar100, flowers102, oxford-pets, stanford-cars, fgvc-aircraft, "
    "food101, or imagefolder:PATH.",
)
@data_root_option
@click.option(
    "--optimizer",
    show_default=True,
    type=RegistryChoice("craft_deploy.finetune.optimizers:OPTIMIZERS"),
    help="adam or sgd (baselines), sam (with --sam-every K: efficient SAM), asam, cram, or a plugin's.",
)
@click.option(
    "--base",
    show_default=True,
    type=click.Choice(["adam", "sgd"]),
    help="Base optimizer of sam/asam/cram.",
)
@click.option(
    "--rho", default=None, type=float, help="Perturbation radius [default: 0.05 for sam and cram, 0.5 for asam]."
)
@click.option(
    "--sam-every",
    show_default=True,
    type=int,
    help="sam/asam: a fresh ascent direction every K steps, reused in between (cost ~(K+1)/K of the base).",
)
@click.option(
    "--cram-sparsities",
    default="0.5,0.7,0.9",
    show_default=True,
    help="cram: sparsities drawn per step for global magnitude compression.",
)
@click.option("--cram-nm", default=None, help="cram: compress to N:M (e.g. 2:4) instead of global magnitude.")
@click.option("--cram-plus", is_flag=True, help="cram: add the clean gradient (CrAM+).")
@click.option("--analyze", is_flag=True, help="Also write analyze.json (lambda_max, weight rank, activation ranges).")
@click.option("--lr", show_default=True, type=float)
@click.option("--weight-decay", show_default=True, type=float)
@click.option("--epochs", show_default=True, type=int)
@click.option("--batch-size", show_default=True, type=int)
@click.option("--img-size", show_default=True, type=int)
@click.option("--warmup-steps", show_default=True, type=int, help="Linear LR warm-up before cosine decay.")
@click.option("--label-smoothing", show_default=True, type=float)
@click.option("--clip-grad", default=None, type=float, help="Clip the global gradient norm before each base step.")
@click.option(
    "--amp", type=click.Choice(["bf16", "fp16"]), help="Mixed precision (fp16 with loss scaling needs a CUDA GPU)."
)
@click.option("--grad-accum", show_default=True, type=int, help="Split each batch into this many micro-batches.")
@click.option("--device", help="cpu or cuda[:N] (default: cuda when a GPU is visible). Under torchrun: one per rank.")
@click.option("--train-subset", type=int, help="Train on the first N images of a seeded permutation.")
@click.option("--eval-subset", type=int, help="Evaluate on the first N val/test images of a seeded permutation.")
@click.option("--seed", show_default=True, type=int)
@click.option("--threads", type=int, help="CPU threads for PyTorch.")
@click.option(
    "--init",
    type=click.Path(file_okay=False),
    help="Recovery: continue training a compressed bundle with its compression kept (pruning masks exact, "
    "quantizers trained through straight-through fake-quant, BatchNorm re-estimated at the end); its model, data and "
    "input size are used.",
)
@click.option(
    "--teacher",
    type=click.Path(file_okay=False),
    help="Distil from this bundle [default with --init: the dense bundle it was compressed from].",
)
@click.option("--kd-temperature", show_default=True, type=float, help="Distillation temperature T.")
@click.option(
    "--kd-alpha", show_default=True, type=float, help="Weight of T^2 KL(teacher || student) on top of the task loss."
)
@click.option(
    "--calib-samples", show_default=True, type=int, help="Recovery: images for the final BatchNorm re-estimation."
)
@click.option(
    "--learn-scales", is_flag=True, help="Recovery: train the activation scales (LSQ) instead of freezing them."
)
@click.option(
    "--method",
    type=click.Choice(["tunecomp"]),
    help="tunecomp: fine-tune and compress in one run, each Linear/1x1 conv fading from its pretrained weights into a "
    "pruned low-rank student (docs/tunecomp.md).",
)
@click.option("--rank-ratio", type=float, help="tunecomp: rank = R x min(in, out) per factorised layer, e.g. 0.25.")
@click.option("--rank-energy", type=float, help="tunecomp: the smallest rank keeping this share of spectral energy.")
@click.option(
    "--rank-multiple",
    show_default=True,
    type=int,
    help="tunecomp: round each rank up to a multiple of this; 16 suits ONNX Runtime CPU on AVX-512, 8 AVX2 and GPUs.",
)
@click.option("--prune-ratio", show_default=True, type=float, help="tunecomp: share of each factor's entries pruned.")
@click.option(
    "--transition",
    show_default=True,
    type=float,
    help="tunecomp: share of the training steps over which the dense branch fades out (and pruning ramps up).",
)
@click.option(
    "--reg-weight",
    show_default=True,
    type=float,
    help="tunecomp: initial weight of the student-vs-dense output regulariser, decaying with the dense branch.",
)
@click.option(
    "--prune-schedule",
    show_default=True,
    type=click.Choice(TUNECOMP_PRUNE_SCHEDULES),
    help="tunecomp: how the factors' sparsity ramps up to --prune-ratio over the transition.",
)
@click.option("--resume", type=click.Path(), help="Continue a killed run: its --out (or its checkpoint).")
@out_option
@overwrite_option
@_guard
def finetune(out, overwrite, resume, **kw) -> None:
    """Fine-tune a pretrained timm model on a dataset; writes a model bundle and finetune.json.

    \b
    Examples:
      craft-deploy finetune --data fashion-mnist --optimizer adam --epochs 2 --train-subset 8000 --out runs/adam
      craft-deploy finetune --optimizer sam --rho 0.05 --out runs/sam
      craft-deploy finetune --optimizer sam --rho 0.05 --out runs/sam --resume runs/sam   # after a kill
      craft-deploy finetune --init runs/sam-24-w8a8 --epochs 1 --train-subset 6000 --out runs/sam-24-w8a8-rec
      craft-deploy finetune --method tunecomp --rank-ratio 0.25 --prune-ratio 0.6 --train-subset 6000 --out runs/tc
    """
    from craft_deploy.finetune import run

    try:
        kw["cram_sparsities"] = tuple(float(v) for v in kw["cram_sparsities"].split(",") if v.strip())
    except ValueError:
        raise CraftError(
            f"--cram-sparsities {kw['cram_sparsities']!r} must be comma-separated ratios, e.g. 0.5,0.7,0.9"
        )
    rec = run(FinetuneConfig(**kw), out, overwrite, resume=resume)
    if not rec:  # a torchrun rank other than 0: rank 0 reports
        return
    m, t = rec["metrics"], rec["timings"]
    what = f"recover {kw['init']}" if kw["init"] else f"finetune {kw['model']} on {kw['data']}"
    click.echo(
        f"\n{what} with {kw['optimizer']}: val top-1 {m['val_top1']:.2f}%, "
        f"test top-1 {m['test_top1']:.2f}% ({rec['data']['test']} images), {t['seconds_per_epoch']:.1f} s/epoch, "
        f"{t['total_seconds']:.0f} s in all\nbundle: {out}"
    )


@defaults_from(CompressConfig)
@main.command(cls=MethodsCommand)
@click.argument("bundle", type=click.Path())
@click.option(
    "--calib-samples",
    show_default=True,
    type=int,
    help="Calibration images, drawn from the training split.",
)
@click.option("--eval-subset", type=int, help="Evaluate on the first N test images of a seeded permutation.")
@click.option("--include", multiple=True, help="Glob(s) over module names to compress (default: Linear/Conv).")
@click.option("--exclude", multiple=True, help="Glob(s) over module names to leave alone.")
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False),
    help="A per-layer recipe (tune.yaml from craft-deploy tune): a treatment per layer, instead of the method options; "
    "its calibration images and seed unless --calib-samples/--seed are given.",
)
@data_root_option
@click.option("--seed", show_default=True, type=int)
@out_option
@overwrite_option
@_guard
def compress(bundle, out, overwrite, include, exclude, recipe, **kw) -> None:
    """Factorise, prune and/or quantize a bundle in one shot; writes a bundle and compress.json.

    \b
    Examples:
      craft-deploy compress runs/adam --rank-ratio 0.25 --calib-samples 256 --out runs/adam-r25
      craft-deploy compress runs/adam --quant w8a8 --calib-samples 256 --out runs/adam-w8a8
      craft-deploy compress runs/sam --sparsity 2:4 --quant w8a8 --out runs/sam-24-w8a8
    """
    from craft_deploy.compress import from_flags, run

    if recipe:
        cfg = _recipe_config(recipe, include, exclude, kw)
    else:
        cfg = from_flags(include=_split(include), exclude=_split(exclude), **kw)
    rec = run(cfg, bundle, out, overwrite)
    m = rec["metrics"]
    click.echo(
        f"\ncompress {bundle}: test top-1 {m['test_top1_before']:.2f}% -> {m['test_top1_after']:.2f}% "
        f"({rec['data']['test']} images)"
    )
    for meth in rec["methods"]:
        click.echo(f"  {meth['summary']}")
    click.echo(f"bundle: {out}")


def _recipe_config(recipe: str, include: tuple[str, ...], exclude: tuple[str, ...], kw: dict[str, Any]) -> Any:
    """compress --recipe: the recipe's method configs; method options, --include and --exclude are refused beside it."""
    from craft_deploy.compress.recipe import read_recipe
    from craft_deploy.toolkit.registry import method_flags

    ctx = click.get_current_context()
    given = [
        f.option
        for key, (f, _) in method_flags().items()
        if ctx.get_parameter_source(key) == ParameterSource.COMMANDLINE
    ]
    given += [o for o, v in (("--include", include), ("--exclude", exclude)) if v]
    if given:
        raise CraftError(f"--recipe gives every layer its treatment; drop {', '.join(given)} (or drop --recipe)")
    parsed = read_recipe(recipe)
    explicit = {
        k: kw[k] for k in ("calib_samples", "seed") if ctx.get_parameter_source(k) == ParameterSource.COMMANDLINE
    }
    return dataclasses.replace(parsed.compress_config(kw["eval_subset"], kw["data_root"]), **explicit)


@main.command()
@click.argument("bundle", type=click.Path())
@_guard
def sparsity(bundle) -> None:
    """Sparsity report of a bundle: per layer target vs achieved zeros, N:M validity, the model's zero fraction.

    \b
    Example:
      craft-deploy sparsity runs/sam-24-w8a8
    """
    from craft_deploy.compress import bundle_sparsity

    rep = bundle_sparsity(bundle)
    click.echo(f"{'layer':<40} {'target':>7} {'achieved':>9} {'N:M ok':>7}")
    for name, row in rep["layers"].items():
        target = "-" if row["target"] is None else f"{row['target']:.3f}"
        valid = {True: "yes", False: "NO"}.get(row.get("nm_valid"), "")
        click.echo(f"{name:<40} {target:>7} {row['achieved']:>9.3f} {valid:>7}")
    click.echo(
        f"pattern: {rep['pattern'] or 'none recorded'}; {100 * rep['model_zero_fraction']:.1f}% of all weights are zero"
    )


@defaults_from(ExportConfig)
@main.command()
@click.argument("bundle", type=click.Path())
@click.option(
    "--format",
    "format_",
    default="onnx",
    show_default=True,
    type=RegistryChoice("craft_deploy.export.targets:TARGETS"),
    cls=RegistryHelpOption,
    registry="craft_deploy.export.targets:TARGETS",
)
@click.option(
    "--precision",
    show_default=True,
    type=click.Choice(EXPORT_PRECISIONS),
    help="auto: int8 Q/DQ for quantized bundles, fp32 otherwise; fp16 keeps LayerNorm/softmax in FP32.",
)
@click.option(
    "--target",
    show_default=True,
    type=RegistryChoice("craft_deploy.toolkit.placement:PLACEMENTS"),
    cls=RegistryHelpOption,
    registry="craft_deploy.toolkit.placement:PLACEMENTS",
    lead="Q/DQ flavour, named after the runtime whose placement it is: ",
)
@click.option("--opset", type=int, help="ONNX opset (default 17, or 21 for INT4 weights).")
@click.option(
    "--verify-samples",
    show_default=True,
    type=int,
    help="Test images run through PyTorch and the exported model to verify the export.",
)
@click.option(
    "--atol",
    type=float,
    help="Largest |logit difference| accepted against PyTorch (default: 1e-3 x max|logit| for FP32, 2e-2 for FP16; "
    "for Q/DQ it replaces the 95% top-1 agreement).",
)
@click.option(
    "--batch-sizes", default="1,16", show_default=True, help="TensorRT profile / AOTI batch range: smallest..largest."
)
@click.option("--sparse", is_flag=True, help="TensorRT: SPARSE_WEIGHTS (2:4-pruned weights may get sparse kernels).")
@click.option("--workspace-gb", show_default=True, type=float, help="TensorRT builder workspace.")
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="TensorRT timing cache file (read and updated).")
@click.option(
    "--device",
    type=click.Choice(list(EDGE_DEVICES)),
    help="--format edge: the device the package is for (recorded; FP8 is refused for GPUs without FP8 tensor cores).",
)
@data_root_option
@out_option
@overwrite_option
@_guard
def export(bundle, out, overwrite, format_, batch_sizes, **kw) -> None:
    """Export a bundle to ONNX, a TensorRT engine, a torch-tensorrt program or an AOTInductor package, verified
    against PyTorch.

    \b
    Examples:
      craft-deploy export runs/sam --precision fp16 --out runs/sam-fp16
      craft-deploy export runs/sam --format aoti --out runs/sam-aoti
      craft-deploy export runs/sam-24-w8a8 --format edge --batch-sizes 1,32 --out runs/sam-24-w8a8-edge
      craft-deploy export runs/sam-w8a8 --target ort-cpu --out runs/sam-w8a8-cpu
      craft-deploy export runs/sam-24-w8a8 --format tensorrt --sparse --out runs/sam-24-w8a8-trt
    """
    from craft_deploy.config import parse_batch_sizes
    from craft_deploy.export import run

    cfg = ExportConfig(format=format_, batch_sizes=parse_batch_sizes(batch_sizes), **kw)
    rec = run(cfg, bundle, out, overwrite)
    checks = ", ".join(
        f"{name}: max |diff| {v['max_abs_diff']:.2e}, top-1 agreement {100 * v['top1_agreement']:.1f}%"
        + (
            f" (ill-conditioned model: vs PyTorch in float64 {v['float64_reference']['export_max_abs_diff']:.2e}, "
            f"PyTorch FP32 itself {v['float64_reference']['pytorch_fp32_max_abs_diff']:.2e})"
            if "export_max_abs_diff" in v.get("float64_reference", {})
            else ""
        )
        for name, v in rec["verification"].items()
    )
    click.echo(
        f"\nexport {bundle} -> {out}/{rec['file']} ({rec['precision']}, weights {rec.get('weights', '-')}, "
        f"{rec['size_bytes'] / 1e6:.1f} MB); vs PyTorch on {cfg.verify_samples} images: {checks}"
    )
    if rec.get("warning"):
        click.echo(f"warning: {rec['warning']}", err=True)


@defaults_from(BenchConfig)
@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path())
@click.option(
    "--backend",
    show_default=True,
    type=RegistryChoice("craft_deploy.bench.backends:BACKENDS"),
    help="Where the models run (see `craft-deploy info` for which are usable here).",
)
@click.option("--batch-sizes", default="1,16", show_default=True, help="Comma-separated batch sizes.")
@click.option("--data", default=None, help="Dataset for accuracy (default: the one the model was tuned on).")
@data_root_option
@click.option("--eval-subset", type=int, help="Accuracy on the first N images of a seeded permutation.")
@click.option("--split", show_default=True, type=click.Choice(["val", "test"]))
@click.option("--warmup", show_default=True, type=int)
@click.option("--iters", show_default=True, type=int, help="Timed iterations (at least).")
@click.option("--min-seconds", show_default=True, type=float, help="Time each batch size at least this.")
@click.option(
    "--max-cv",
    show_default=True,
    type=float,
    help="A batch size whose coefficient of variation exceeds this is re-measured.",
)
@click.option("--retries", show_default=True, type=int, help="Re-measurements of a noisy batch size.")
@click.option(
    "--rounds",
    show_default=True,
    type=int,
    help="Time the models round-robin in this many passes (each model and batch once per pass; p50 is the median "
    "of the passes), so that drift of a shared machine hits every model alike: use it to compare models.",
)
@click.option("--threads", type=int, help="CPU threads for the backend.")
@click.option("--compile", is_flag=True, help="pytorch backend: torch.compile the model.")
@click.option(
    "--precision",
    show_default=True,
    type=click.Choice(["fp32", "bf16", "fp16"]),
    help="pytorch backend: run the bundle in this float precision.",
)
@click.option(
    "--kernels",
    type=RegistryChoice("craft_deploy.bench.torch_kernels:TORCH_KERNELS"),
    help="pytorch backend: real INT8 / FP8 / 2:4 kernels for the Linear layers, checked against the bundle's "
    "fake-quant logits (exit 4 when they disagree).",
)
@click.option("--include-transfer", is_flag=True, help="GPU backends: time the host-to-device copy too.")
@click.option(
    "--from-trtexec",
    is_flag=True,
    help="MODELS are device packages (export --format edge) holding bench.sh's trtexec timings (times-bN.json): "
    "turn them into bench.json, gated like any other (latency only).",
)
@click.option("--baseline", type=click.Path(dir_okay=False), help="A previous bench.json to gate against.")
@click.option(
    "--max-latency-regression",
    show_default=True,
    type=float,
    help="Fail when p50 latency grows by more than this fraction.",
)
@click.option(
    "--max-accuracy-drop",
    show_default=True,
    type=float,
    help="Fail when top-1 falls by more than this many points.",
)
@click.option("--update-baseline", is_flag=True, help="Write this run to --baseline instead of gating against it.")
@click.option(
    "--against",
    type=click.Path(exists=True),
    help="Paired gate: the baseline artifact itself (ONNX file, export directory, engine, package), timed beside the "
    "one candidate in interleaved blocks; fails (exit 3) only when the ratio's interval lies above "
    "1 + --max-latency-regression, says 'undecided' (exit 0) when it still straddles it after --max-blocks.",
)
@click.option("--min-blocks", show_default=True, type=int, help="--against: blocks timed before the first verdict.")
@click.option("--max-blocks", show_default=True, type=int, help="--against: blocks timed at most per batch size.")
@click.option("--confidence", show_default=True, type=float, help="--against: confidence of the ratio's interval.")
@out_option
@overwrite_option
@_guard
def bench(models, out, overwrite, batch_sizes, from_trtexec, **kw) -> None:
    """Accuracy and latency of exported models (or bundles with --backend pytorch); bench.json, report.md, plots.

    With --baseline the run is a regression gate against a stored bench.json: it exits 3 when any (model, backend,
    batch) row is slower or less accurate than the baseline allows, 0 when it passes, 2 on bad input. With --against
    BASELINE the gate is paired (the baseline artifact timed beside the candidate, for shared runners): exit 3 when
    the slowdown's interval lies above the threshold, top-1 fell too far, or a layer fell back to float; exit 0 when
    it passed or stayed undecided (said so in the table and in bench.json's gate.verdict).

    \b
    Examples:
      craft-deploy bench runs/adam-w8a8-onnx/model.onnx --backend ort-cpu --batch-sizes 1,16 --out runs/bench
      craft-deploy bench runs/adam-fp32-onnx runs/adam-w8a8-onnx --rounds 5 --out runs/compare
      craft-deploy bench runs/m.onnx --baseline ci/bench-baseline.json --update-baseline --out runs/b0
      craft-deploy bench runs/m.onnx --baseline ci/bench-baseline.json --max-latency-regression 0.10 --out runs/b1
      craft-deploy bench runs/new/model.onnx --against runs/main/model.onnx --max-latency-regression 0.05 --out runs/g
    """
    from craft_deploy.bench import EXIT_REGRESSION, run
    from craft_deploy.config import parse_batch_sizes

    cfg = BenchConfig(batch_sizes=parse_batch_sizes(batch_sizes), **kw)
    if from_trtexec:
        from craft_deploy.bench import trtexec_times

        rec = trtexec_times.run(cfg, list(models), out, overwrite)
    else:
        rec = run(cfg, list(models), out, overwrite)
    click.echo(
        f"\n{'model':<40} {'batch':>5} {'top-1':>7} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'img/s':>9} {'cv':>6}"
    )
    for r in rec["results"]:
        click.echo(
            f"{r['model'][-40:]:<40} {r['batch']:>5} {_top1(r['top1']):>7} {r['p50_ms']:>9.2f} {r['p90_ms']:>9.2f} "
            f"{r['p99_ms']:>9.2f} {r['images_per_second']:>9.1f} {r['cv']:>6.3f}"
            + (f"  (re-measured {r['remeasured']}x)" if r["remeasured"] else "")
            + (f"  (median of {len(r['round_p50_ms'])} round-robin passes)" if "round_p50_ms" in r else "")
        )
    first = rec["results"][0]
    measured = f"accuracy on {first['samples']} {first['dataset']} {first['split']} images" if first["samples"] else ""
    click.echo(f"{measured or 'timings only'}, backend {first['backend']}; report: {out}/report.md")
    if kw["update_baseline"]:
        click.echo(f"baseline written: {kw['baseline']}")
    if rec["gate"]:
        click.echo("\n" + rec["gate"]["table"])
        if not rec["gate"]["passed"]:
            sys.exit(EXIT_REGRESSION)


def _top1(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


@defaults_from(AnalyzeConfig)
@main.command()
@click.argument("bundle", type=click.Path())
@click.option(
    "--lambda-images",
    show_default=True,
    type=int,
    help="Fixed training images for the Hessian's largest eigenvalue.",
)
@click.option("--lambda-iters", show_default=True, type=int, help="Power iterations at most.")
@click.option("--lambda-tol", show_default=True, type=float, help="Relative change that counts as converged.")
@click.option(
    "--lambda-batchnorm",
    show_default=True,
    type=click.Choice(["eval", "batch"]),
    help="BatchNorm in the Hessian's loss: running statistics (eval) or each batch's own (batch, as in training).",
)
@click.option("--calib-samples", show_default=True, type=int, help="Images for activation ranges.")
@data_root_option
@click.option("--seed", show_default=True, type=int)
@out_option
@overwrite_option
@_guard
def analyze(bundle, out, overwrite, **kw) -> None:
    """Sharpness (lambda_max of the loss Hessian), weight rank, activation ranges and multiply-adds; analyze.json and
    analyze.png.

    \b
    Example:
      craft-deploy analyze runs/sam --out runs/sam-analyze
    """
    from craft_deploy.analyze import run

    rec = run(AnalyzeConfig(**kw), bundle, out, overwrite)
    s = rec["sharpness"]
    ranks = [r["rank_fraction_80"] for r in rec["weight_rank"].values()]
    worst = max(rec["activation_ranges"].items(), key=lambda kv: kv[1]["outlier_ratio"])
    click.echo(
        f"\nanalyze {bundle}: lambda_max {s['lambda_max']:.3f} ({s['iterations']} power iterations on "
        f"{s['images']} images, {'converged' if s['converged'] else 'NOT converged'}, {s['seconds']:.0f} s)"
    )
    click.echo(
        f"  weight rank: median layer needs {100 * sorted(ranks)[len(ranks) // 2]:.0f}% of its components "
        "for 80% of its energy"
    )
    c = rec["cost"]
    click.echo(
        f"  cost per image: {c['multiply_adds'] / 1e6:.1f} M multiply-adds in Conv/Linear layers "
        f"({c['nonzero_multiply_adds'] / 1e6:.1f} M on nonzero weights), {c['parameters'] / 1e6:.2f} M parameters"
    )
    click.echo(f"  activations: largest outlier ratio {worst[1]['outlier_ratio']:.1f} in {worst[0]}; report: {out}")


def _list(cast):
    """A click callback: a comma-separated option value as a tuple (None when the option is not given)."""

    def parse(ctx, param, value):
        if value is None:
            return None
        items = [v.strip() for v in value.split(",") if v.strip()]
        try:
            return tuple(cast(v) for v in items)
        except ValueError:
            raise click.BadParameter(f"{value!r}: expected comma-separated {cast.__name__} values") from None

    return parse


@defaults_from("craft_deploy.config:TuneConfig")
@main.command()
@click.argument("bundle", type=click.Path())
@click.option(
    "--objective",
    show_default=True,
    type=click.Choice(["size", "sparse-share", "latency"]),
    help="What the recipe maximises within --max-drop: weight storage saved, the share of weights in 2:4, or the "
    "speed on --backend (each layer's kernel time saved, profiled; finalists timed side by side).",
)
@click.option("--max-drop", show_default=True, type=float, help="Top-1 points the recipe may lose on held-out images.")
@click.option(
    "--margin", show_default=True, type=float, help="The search aims at --max-drop minus this on validation images."
)
@click.option(
    "--searches",
    callback=_list(str),
    help="fallback (revert whole layers to float, worst first), budgeted (Lagrangian over the table: layers step "
    "down their own options), prefix (the first k layers float: one float -> integer boundary); the best finalist "
    "within budget wins. [default: fallback,budgeted; latency: fallback,budgeted,prefix]",
)
@click.option(
    "--analyze-only", is_flag=True, help="Write the per-layer sensitivity table and its validation only, no search."
)
@click.option(
    "--treatments",
    callback=_list(str),
    help="Comma-separated treatments, each applied to one layer at a time: int8 (W8A8, MSE), w4 (4-bit weights, "
    "float activations), any wXaY, N:M such as 2:4 (with --prune-method), or N:M+bits (2:4+int8). [default: the "
    "objective's (size: int8,w4,w3; sparse-share: 2:4; latency: w7a8); int8,w4,2:4 with --analyze-only]",
)
@click.option(
    "--backend",
    show_default=True,
    type=click.Choice(["ort-cpu"]),
    help="--objective latency: the backend layers are priced and finalists timed on (exported for it).",
)
@click.option(
    "--latency-batch", show_default=True, type=int, help="--objective latency: the batch layers are priced at."
)
@click.option(
    "--profile-runs", show_default=True, type=int, help="--objective latency: profiled runs per model when pricing."
)
@click.option(
    "--rounds", show_default=True, type=int, help="--objective latency: round-robin passes timing the finalists."
)
@click.option(
    "--min-speedup",
    show_default=True,
    type=float,
    help="--objective latency: the measured speed-up over the float model the recipe must reach (else exit 2).",
)
@click.option("--threads", type=int, help="--objective latency: the backend's threads [default: its own].")
@click.option(
    "--calib-samples",
    show_default=True,
    type=int,
    help="Training images: calibration, KL score, BatchNorm re-estimation.",
)
@click.option("--eval-subset", show_default=True, type=int, help="Validation (search) and test (check) images.")
@click.option("--validate", show_default=True, type=int, help="(layer, treatment) pairs checked on held-out images.")
@click.option(
    "--prune-method",
    show_default=True,
    type=RegistryChoice("craft_deploy.compress.prune:PRUNE_SCORES"),
    help="The score of the 2:4 treatment.",
)
@click.option(
    "--bn-recalibrate/--no-bn-recalibrate",
    show_default=True,
    help="Re-estimate BatchNorm statistics in every recipe (once, after all its layers are treated).",
)
@data_root_option
@click.option("--seed", show_default=True, type=int)
@out_option
@overwrite_option
@_guard
def tune(bundle, out, overwrite, **kw) -> None:
    """A per-layer recipe: each treatment on each layer alone (KL on calibration images), then the most aggressive
    per-layer recipe whose top-1 drop stays within --max-drop, searched on validation images and checked on held-out
    test images; tune.yaml (for compress --recipe), the tuned bundle, tune.json and plots.

    \b
    Examples:
      craft-deploy tune runs/adam --objective size --max-drop 1.0 --out runs/adam-tune
      craft-deploy tune runs/adam --objective sparse-share --out runs/adam-tune-24
      craft-deploy tune runs/adam --objective latency --backend ort-cpu --out runs/adam-tune-fast
      craft-deploy compress runs/adam --recipe runs/adam-tune/tune.yaml --out runs/adam-tuned
      craft-deploy tune runs/adam --analyze-only --out runs/adam-sens
    """
    from craft_deploy.config import TuneConfig
    from craft_deploy.tune import run

    rec = run(TuneConfig(**kw), bundle, out, overwrite)
    scored = sorted((r for r in rec["sensitivity"] if "kl" in r), key=lambda r: -r["kl"])
    v = rec["validation"]
    click.echo(f"\ntune {bundle}: {len(scored)} (layer, treatment) pairs scored")
    for r in scored[:5]:
        drop = f", test top-1 drop {r['test_top1_drop']:.2f}" if "test_top1_drop" in r else ""
        click.echo(f"  {r['treatment']:>5} on {r['layer']}: KL {r['kl']:.4f}{drop}")
    if v.get("pairs"):
        rho = v["spearman_kl_vs_drop"]
        click.echo(f"  validated {v['pairs']} pairs on held-out images; Spearman(KL, drop) "
                   f"{'n/a' if rho is None else f'{rho:.2f}'}")  # fmt: skip
    for f in rec.get("finalists", []):
        if "test_top1_drop" not in f:
            click.echo(f"  {f['search']}: {f['why']}")
            continue
        mark = "within budget" if f["passed"] else "OVER the budget"
        mb = f["weight_megabytes"]
        click.echo(
            f"  {f['search']}: {f['counts']}, {100 * f['value_share']:.0f}% of the {kw['objective']} objective, "
            f"{mb['tuned']:.2f} MB of weights ({mb['dense']:.2f} float), {100 * mb['nm_share_of_all_weights']:.0f}% "
            f"in N:M; test top-1 drop {f['test_top1_drop']:.2f} (val {f['val_top1_drop']:.2f}, predicted "
            f"{'n/a' if f['predicted_drop'] is None else '%.2f' % f['predicted_drop']}): {mark}"
        )
        if "latency" in f:
            ms = f["latency"]["p50_ms"]
            click.echo(f"    on {kw['backend']}: {' / '.join(f'{v:.2f}' for v in ms.values())} ms p50 at batch "
                       f"{' / '.join(map(str, ms))}, {f['latency']['speedup_vs_float']:.2f}x the float model's "
                       "(timed side by side)")  # fmt: skip
    if "recipe" in rec:
        click.echo(f"recipe: {out}/tune.yaml ({rec['chosen']}), bundle: {out}/bundle")
    click.echo(f"report: {out}/tune.json, {', '.join(f'{out}/{p}' for p in rec['plots'])}")


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--model", help="timm model name (default: the bundled tf_efficientnet_lite0).")
@click.option("--data", help="Dataset (default: fashion-mnist).")
@data_root_option
@click.option(
    "--optimizers", callback=_list(str), help="Fine-tuning optimizers, the baseline first: adam,sam:0.05,sam:0.5."
)
@click.option("--seeds", callback=_list(int), help="Seeds, e.g. 0,1,2.")
@click.option("--grid", callback=_list(str), help="Compression recipes, e.g. w8a8,w4a16+bn,2:4+sparsegpt+bn.")
@click.option("--calibrators", callback=_list(str), help="Calibrators for recipes that name none (default: mse).")
@click.option("--epochs", type=int, help="Fine-tuning epochs (study config `finetune: {epochs: N}`).")
@click.option("--train-subset", type=int, help="Fine-tune on N training images (`finetune: {train_subset: N}`).")
@click.option("--eval-subset", type=int, help="Test images per seed (default 2000).")
@click.option("--recover-worst", type=int, help="Recover the K recipes with the largest mean drop (default 2).")
@click.option("--tunecomp", callback=_list(float), help="TuneComp rank ratios, e.g. 0.25 (empty string: none).")
@click.option("--analyze/--no-analyze", default=None, help="lambda_max of every fine-tuning (default on).")
@click.option("--backends", callback=_list(str), help="Bench backends for deployable cells (default: ort-cpu).")
@click.option("--batch-sizes", callback=_list(int), help="Bench batch sizes (default 1,16).")
@click.option("--max-drop", type=float, help="Accuracy budget for the recommendation, points of top-1 (default 1.0).")
@click.option("--budget-minutes", type=float, help="Trim the grid (in the order docs/study.md states) to fit.")
@click.option("--jobs", type=int, help="Cells run in parallel (threads are divided between them).")
@click.option("--executor", type=click.Choice(["local", "ray"]), help="local processes (default) or a Ray cluster.")
@click.option("--ray-address", help="--executor ray: a running cluster's address (default: start a local Ray).")
@click.option("--threads", type=int, help="CPU threads for the whole study (default: every core).")
@click.option("--device", help="cpu or cuda for fine-tuning (default: cuda when a GPU is visible).")
@click.option("--retry-failed", is_flag=True, help="Run the cells recorded as failed again.")
@out_option
@overwrite_option
@_guard
def study(config, out, overwrite, retry_failed, ray_address, epochs, train_subset, **kw) -> None:
    """Fine-tune with each optimizer x seed, compress with every recipe of a grid, recover the worst, TuneComp,
    export and bench what deploys; report.md answers whether CrAFT (SAM) helps on this model and data. Resumable:
    run the same command again after a kill and finished cells are kept. CONFIG is an optional YAML file of
    StudyConfig fields; the flags override it."""
    from craft_deploy import study as study_stage
    from craft_deploy.config import StudyConfig

    overrides = {k: v for k, v in kw.items() if v is not None}
    shortcuts = {k: v for k, v in (("epochs", epochs), ("train_subset", train_subset)) if v is not None}
    if shortcuts:  # merged into the config file's `finetune:` settings by load_study_config
        overrides["finetune"] = shortcuts
    cfg = study_stage.load_study_config(config, **overrides) if config else StudyConfig.from_dict(overrides)
    rec = study_stage.run(cfg, out, overwrite=overwrite, retry_failed=retry_failed, ray_address=ray_address)
    failed = sum(c["status"] == "error" for c in rec["cells"])
    click.echo(f"\nstudy: {len(rec['cells'])} cells ({failed} failed, {len(rec['trimmed'])} trimmed); "
               f"report: {out}/report.md")  # fmt: skip
    for backend, pick in rec["report"]["recommendation"].items():
        click.echo(f"  {backend}: {pick['optimizer']} + {pick['recipe']}, {pick['latency_ms']:.2f} ms "
                   f"({pick['latency_source']}), top-1 {pick['backend_top1']:.2f}")  # fmt: skip
    across = rec["report"].get("across_backends")
    if across:
        click.echo(f"  fastest across backends: {across['backend']} + {across['recipe']} (timed in separate cells)")


@main.command()
def info() -> None:
    """Library versions, devices, and which backends are usable here (and why not)."""
    from craft_deploy.bench.backends import BACKENDS
    from craft_deploy.records import environment

    env = environment()
    click.echo(f"craft-deploy {env['craft_deploy']} on Python {env['python']}, {env['platform']}")
    click.echo(f"cpu: {env['cpu']} ({env['cpu_count']} cores)")
    click.echo(f"gpu: {env.get('gpu', 'none visible to torch')}")
    for lib, ver in env["libraries"].items():
        click.echo(f"  {lib:<16} {ver or 'not installed'}")
    click.echo("backends:")
    for name, cls in BACKENDS.items():
        ok, why = cls.availability()
        click.echo(f"  {name:<15} {'usable' if ok else 'unavailable: ' + why}")
    if BACKENDS["openvino"].availability()[0]:
        import openvino as ov

        core = ov.Core()
        for device in core.available_devices:
            caps = ", ".join(core.get_property(device, "OPTIMIZATION_CAPABILITIES"))
            click.echo(f"openvino {device}: {core.get_property(device, 'FULL_DEVICE_NAME')} ({caps})")


if __name__ == "__main__":
    main()
