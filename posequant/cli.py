"""The ``posequant`` command: each subcommand gathers options, calls one library function, prints.

User mistakes (:class:`PosequantError`) are caught here, once, and printed as one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

import click

from posequant.core.args import ALIASES, BACKENDS, DEVICES, ONNX_BACKENDS, Whole, Wholes, canonical
from posequant.core.cpu import KINDS as CPU_KINDS
from posequant.core.errors import PosequantError
from posequant.core.fileio import (
    STDOUT,
    StdoutError,
    Terminated,
    arch_file,
    check_outputs,
    terminate_cleanly,
    write_text_atomic,
)
from posequant.core.metadata import parse_size
from posequant.core.numbers import OptionError, check_number, normalisation
from posequant.core.quiet import set_verbose, show_warnings
from posequant.core.version import __version__


def _from_echo(e: BaseException) -> bool:
    """Whether ``e`` was raised writing a line out (click.echo): standard output or error could not take it."""
    tb = e.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_name == "echo" and "click" in tb.tb_frame.f_code.co_filename


def _stdout_failed(e: OSError | StdoutError) -> None:
    """One line for a standard output that cannot be written (a full device, a closed pipe); what is still
    buffered then goes nowhere, quietly, when the process exits."""
    with contextlib.suppress(OSError):
        click.echo(f"error: {e if isinstance(e, StdoutError) else StdoutError.of(e)}", err=True)
    with contextlib.suppress(OSError, ValueError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class PosequantGroup(click.Group):
    def main(self, *args, **kwargs):
        try:
            return super().main(*args, **kwargs)
        except OSError as e:  # ours are PosequantErrors by now; click's own lines (--help) end here
            if not _from_echo(e):
                raise
            _stdout_failed(e)
            sys.exit(2)

    def invoke(self, ctx):
        try:
            # SIGTERM (CI runners, `timeout`) unwinds like Ctrl-C: every temporary file of the command is removed
            with terminate_cleanly(), show_warnings(lambda line: click.echo(line, err=True)):
                return super().invoke(ctx)
        except StdoutError as e:
            _stdout_failed(e)
            ctx.exit(e.exit_code)
        except OSError as e:
            if not _from_echo(e):
                raise
            _stdout_failed(e)
            ctx.exit(2)
        except PosequantError as e:
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except Terminated:
            click.echo("terminated", err=True)
            ctx.exit(128 + signal.SIGTERM)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


def _size(ctx, param, value):
    if value is None:
        return None
    try:
        return parse_size(value)
    except PosequantError as e:
        raise click.BadParameter(str(e)) from None


def _triple(ctx, param, value):
    if value is None:
        return None
    try:
        vals = tuple(float(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not three comma-separated numbers, e.g. 0.485,0.456,0.406") from None
    if len(vals) != 3:
        raise click.BadParameter(f"needs 3 comma-separated values, got {len(vals)}")
    try:  # units, NaN/inf, std > 0: checked now; the library converts 0-255 units
        normalisation(vals, param.name)
    except OptionError as e:
        raise click.BadParameter(str(e).removeprefix(f"--{param.name} ")) from None
    return vals


class Number(click.ParamType):
    """A float option: finite and in range (posequant.core.numbers), for every numeric option alike."""

    name = "number"

    def __init__(self, minimum: float | None = 0.0, above: bool = False, maximum: float | None = None):
        self.minimum, self.above, self.maximum = minimum, above, maximum

    def convert(self, value, param, ctx):
        option = max(param.opts, key=len) if param else "value"
        try:
            return check_number(option, value, minimum=self.minimum, above=self.above, maximum=self.maximum)
        except OptionError as e:  # click names the option already
            self.fail(str(e).removeprefix(f"{option} "), param, ctx)


FRACTION = Number(above=True, maximum=1.0)  # detector thresholds: in (0, 1]
AGREEMENT = Number(maximum=1.0)  # an OKS: in [0, 1]
# posequant.benchmarks.detect's DEFAULT_IOU, PREDICT_SCORE and EVAL_SCORE (tests/test_detect.py checks they agree)
DET_IOU, DET_SCORE_PREDICT, DET_SCORE_EVAL = 0.65, 0.3, 0.01


class Count(click.ParamType):
    """A whole-number option, checked by posequant.core.args as the library checks the same argument."""

    name = "integer"

    def __init__(self, minimum: int = 1):
        self.check = Whole(minimum)

    def convert(self, value, param, ctx):
        option = max(param.opts, key=len) if param else "value"
        try:
            return self.check(option, value)
        except OptionError as e:
            self.fail(str(e).removeprefix(f"{option} "), param, ctx)


DROP = Number(minimum=None)  # drop budgets: finite (negative: INT8 must beat float, a gate that only fails more)
SPEEDUP = Number()  # finite, >= 0


def _batch(ctx, param, value):
    if value in (None, "dynamic"):
        return None
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter(f"{value!r}: use 'dynamic' or a positive number") from None
    if n < 1:
        raise click.BadParameter(f"{value!r}: use 'dynamic' or a positive number")
    return n


def _check(outputs: dict, inputs: dict) -> None:
    """Every output checked against every input (a model with all of its files) before any work; ``--json -``
    is standard output."""
    check_outputs(outputs, inputs, stdout_ok={"--json"})


def _echo(text: str, json_out: str | None) -> None:
    """Human output; on stderr when ``--json -`` keeps stdout for the JSON alone."""
    click.echo(text, err=json_out == STDOUT)


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n", "--json")
        if path != STDOUT:
            click.echo(f"wrote {path}")


def _progress(msg: str) -> None:
    click.echo(f"  {msg}", err=True)


# The runtime names every command takes (eval, bench, gate, quantize, pipeline) live in posequant.core.args,
# shared with the library; checked against posequant.benchmarks.runners and calibration.quantize.


class Names(click.Choice):
    """A choice of backends/devices: any case, and the aliases above."""

    def __init__(self, choices):
        super().__init__(choices, case_sensitive=False)

    def convert(self, value, param, ctx):
        return super().convert(canonical(value), param, ctx)


def backend_option(choices=ONNX_BACKENDS, default="ort", help=None, name="--backend"):
    return click.option(name, type=Names(choices), default=default, show_default=True, help=help)


device_option = click.option("--device", type=Names(DEVICES), default="cpu", show_default=True,
                             help="Where the models run (cuda: an NVIDIA GPU).")


def detector_options(default_score: float, boxes_help: str):
    """--boxes, --detector, --det-score, --det-iou: where the person boxes come from (eval, gate, predict).
    The defaults are posequant.benchmarks.detect's (not imported here, to keep the command quick to start)."""

    def wrap(f):
        for option in reversed((
            click.option("--boxes", type=click.Path(dir_okay=False, path_type=Path), metavar="DETS.json",
                         help=boxes_help),
            click.option("--detector", type=click.Path(dir_okay=False, path_type=Path), metavar="DET.onnx",
                         help="A person detector to find the boxes (YOLOX's ONNX layout, float or INT8), run on "
                              "the same backend as the model."),
            click.option("--det-score", type=FRACTION, default=default_score, show_default=True,
                         help="With --detector: keep boxes whose person score is at least this."),
            click.option("--det-iou", type=FRACTION, default=DET_IOU, show_default=True,
                         help="With --detector: non-maximum suppression drops boxes overlapping a better one by "
                              "more than this IoU."),
        )):
            f = option(f)
        return f

    return wrap


@click.group(cls=PosequantGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="posequant")
@click.option("--verbose", is_flag=True,
              help="Also show what the libraries underneath print (ONNX Runtime, NNCF, OpenVINO, torch, OpenCV).")
def main(verbose):
    """Trained PyTorch pose models to fast, verified INT8 deployments."""
    set_verbose(verbose)


arch_option = click.option(
    "--arch", metavar="FAMILY|FILE.py:fn|pkg.mod:fn",
    help="Architecture: detected from the weights by default; a family name to insist on one, or "
         "a builder function returning an nn.Module for custom models.")
trust_option = click.option(
    "--trust-pickle", is_flag=True,
    help="Allow checkpoints holding pickled Python objects (runs code from the file: trusted files only).")


@main.command("inspect")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@arch_option
@trust_option
@click.option("--json", "json_out", metavar="OUT", help="Also write the findings as JSON (- for standard output).")
def inspect_cmd(checkpoint, arch, trust_pickle, json_out):
    """Show which architecture a checkpoint holds and how many parameters it has."""
    from posequant.exporter import inspect_checkpoint
    from posequant.exporter.report import format_inspect

    _check({"--json": json_out}, {"CHECKPOINT": checkpoint, "--arch": arch_file(arch)})
    info = inspect_checkpoint(checkpoint, arch=arch, trust_pickle=trust_pickle)
    _echo(format_inspect(info), json_out)
    _write_json(json_out, info.to_dict())


@main.command("export-pose")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), help="ONNX file to write [default: beside the checkpoint].")
@arch_option
@click.option("--input-size", callback=_size, metavar="HxW",
              help="Input height x width, e.g. 256x192 [default: the size an mmpose checkpoint records, else "
                   "256x256 for 16 joints (MPII), 256x192 for 17 (COCO)].")
@click.option("--keypoints", type=click.Choice(["mpii", "coco"], case_sensitive=False),
              help="Keypoint set (names, flip pairs) [default: from the joint count].")
@click.option("--color", type=click.Choice(["rgb", "bgr"], case_sensitive=False),
              help="Channel order the model was trained on [default: the family's].")
@click.option("--mean", callback=_triple, metavar="R,G,B", help="Per-channel mean, 0-1 (or 0-255) units.")
@click.option("--std", callback=_triple, metavar="R,G,B", help="Per-channel std, 0-1 (or 0-255) units.")
@click.option("--opset", type=int, help="ONNX opset, 17 or newer [default: 17; an ONNX MODEL keeps its own, and "
                                        "is converted when --opset is given].")
@click.option("--batch", callback=_batch, default="dynamic", show_default=True, metavar="dynamic|N",
              help="Batch dimension: dynamic, or fixed to N.")
@click.option("--no-simplify", is_flag=True, help="Skip onnxsim simplification.")
@trust_option
@click.option("--data", type=click.Path(path_type=Path), metavar="ROOT",
              help="Also verify on real person crops from this dataset (MPII, COCO or an image folder).")
@click.option("--data-samples", type=Count(1), default=8, show_default=True, help="Crops to verify on.")
@click.option("--rtol", type=Number(above=True), default=1e-4, show_default=True,
              help="Tolerance: max abs diff relative to the output's max.")
@click.option("--no-verify", is_flag=True, help="Skip the comparison with PyTorch (the original, for an ONNX input).")
@click.option("--joints", metavar="NAME,...",
              help="For an ONNX input: its output channels' joints, in channel order, in the --keypoints set's names.")
@click.option("--simcc-outputs", metavar="X,Y",
              help="For a SimCC ONNX input: its x and y output names (needed when their lengths cannot say: a "
                   "square input).")
@click.option("--json", "json_out", metavar="OUT", help="Also write the result as JSON (- for standard output).")
def export_pose_cmd(checkpoint, output, arch, input_size, keypoints, color, mean, std, opset, batch,
                    no_simplify, trust_pickle, data, data_samples, rtol, no_verify, joints, simcc_outputs, json_out):
    """Export a pose checkpoint, or stamp a third-party heatmap or SimCC ONNX model, to a simplified, verified
    ONNX model with its metadata."""
    from posequant.exporter import export_pose
    from posequant.exporter.export import default_output
    from posequant.exporter.report import format_export

    _check({"-o": output or default_output(checkpoint), "--json": json_out},
           {"MODEL" if checkpoint.suffix.lower() == ".onnx" else "CHECKPOINT": checkpoint, "--arch": arch_file(arch),
            "--data": data})
    result = export_pose(
        checkpoint, output, arch=arch, input_size=input_size, keypoints=keypoints, color=color,
        mean=mean, std=std, opset=opset, batch=batch, simplify=not no_simplify,
        trust_pickle=trust_pickle, verify_model=not no_verify, data=data, data_samples=data_samples,
        rtol=rtol, joints=joints, simcc_outputs=simcc_outputs, progress=_progress)
    _echo(format_export(result), json_out)
    _write_json(json_out, result.to_dict())


@main.command("eval")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), metavar="ROOT", help="MPII or COCO dataset root.")
@click.option("--split", help="Split to evaluate [default: MPII valid, COCO val].")
@click.option("--format", "fmt", type=click.Choice(["mpii", "coco"]), help="Dataset layout [default: detected].")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Flip test (official).")
@backend_option(BACKENDS, default=None, help="Runtime the model is evaluated on (torch needs a checkpoint MODEL) "
                                            "[default: ort; openvino for an .xml IR, tensorrt for an .engine].")
@device_option
@click.option("--batch", type=Count(1), default=8, show_default=True, help="People per inference call.")
@click.option("--limit", type=Count(1), help="Only the first N people.")
@click.option("--skip-missing", is_flag=True,
              help="Go on when annotated images are missing, truncated or undecodable (a warning names them).")
@detector_options(DET_SCORE_EVAL, "COCO AP on these person boxes (COCO detection results: image_id, bbox, score, "
                                  "category_id 1) instead of the ground truth's, HRNet's way: rescoring, OKS-NMS.")
@arch_option
@click.option("--input-size", callback=_size, metavar="HxW", help="For a checkpoint MODEL (see export-pose).")
@click.option("--keypoints", type=click.Choice(["mpii", "coco"], case_sensitive=False),
              help="For a checkpoint MODEL (see export-pose).")
@click.option("--color", type=click.Choice(["rgb", "bgr"], case_sensitive=False),
              help="For a checkpoint MODEL (see export-pose).")
@trust_option
@click.option("--json", "json_out", metavar="OUT", help="Also write the result as JSON (- for standard output).")
@click.option("--save-preds", metavar="OUT.mat", help="Save MPII predictions (HRNet's pred.mat layout).")
def eval_cmd(model, data, split, fmt, flip, backend, device, batch, limit, skip_missing, boxes, detector, det_score,
             det_iou, arch, input_size, keypoints, color, trust_pickle, json_out, save_preds):
    """Evaluate an ONNX model or a checkpoint: PCKh (MPII) or AP and PCK@0.2 (COCO)."""
    from posequant.benchmarks.evaluate import evaluate
    from posequant.benchmarks.predictions import check_save_preds, save_mpii_preds
    from posequant.benchmarks.report import format_eval

    # fail before the run, not after it
    _check({"--json": json_out, "--save-preds": save_preds},
           {"MODEL": model, "--data": data, "--arch": arch_file(arch), "--boxes": boxes, "--detector": detector})
    if save_preds:
        check_save_preds(save_preds, data, format=fmt, split=split, limit=limit, skip_missing=skip_missing)
    export_options = dict(arch=arch, input_size=input_size, keypoints=keypoints, color=color,
                          trust_pickle=trust_pickle)
    result = evaluate(model, data, split=split, format=fmt, flip=flip, backend=backend, device=device,
                      batch=batch, limit=limit, skip_missing=skip_missing, boxes=boxes, detector=detector,
                      det_score=det_score, det_iou=det_iou, export_options=export_options,
                      progress=_progress, progress_bar=sys.stderr.isatty(), warn=_warn)
    _echo(format_eval(result), json_out)
    if save_preds:
        if result.partial:  # checked before the run; a guard, since pred.mat must hold every person
            raise PosequantError(f"--save-preds needs every person of the split; {len(result.skipped)} image(s) "
                                 f"were skipped and {len(result.skipped_records)} degenerate record(s) left out: "
                                 "restore them to save predictions")
        save_mpii_preds(save_preds, result.preds)
        _echo(f"wrote {save_preds}", json_out)
    _write_json(json_out, result.to_dict())


@main.command("eval-preds")
@click.argument("preds", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--gt", required=True, type=click.Path(path_type=Path), help="gt_valid.mat (official head boxes).")
@click.option("--zero-based", is_flag=True, help="Predictions made by Python code (0-based pixels).")
@click.option("--json", "json_out", metavar="OUT", help="Also write the table as JSON (- for standard output).")
def eval_preds_cmd(preds, gt, zero_based, json_out):
    """Score saved MPII predictions (.mat, .h5, .npy, .json) with the official PCKh protocol."""
    from posequant.benchmarks.predictions import eval_mpii_preds
    from posequant.benchmarks.report import format_metrics

    _check({"--json": json_out}, {"PREDS": preds, "--gt": gt})
    result = eval_mpii_preds(preds, gt, zero_based=zero_based)
    _echo(format_metrics(result.table), json_out)
    _write_json(json_out, {"metrics": result.table, "predictions": str(preds), "gt": str(gt),
                           "zero_based": zero_based})


def _int_list(ctx, param, value):
    try:
        return Wholes(1)(param.opts[0], value)
    except OptionError as e:
        raise click.BadParameter(f"{e}, e.g. 1,8".removeprefix(f"{param.opts[0]} ")) from None


def _backend_list(ctx, param, value):
    import difflib

    names = [canonical(n) for v in value for n in v.replace(" ", "").split(",") if n]
    for n in names:
        if n not in BACKENDS:
            close = difflib.get_close_matches(n, BACKENDS, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise click.BadParameter(f"{n!r}{hint}: choose from {', '.join(BACKENDS)}")
    return tuple(names) or None


backend_list_option = click.option(
    "--backend", "backends", multiple=True, callback=_backend_list, metavar="NAME[,NAME]",
    help=f"{', '.join(BACKENDS)}; repeat or comma-separate [default: every backend of the device].")


@main.command("bench")
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@device_option
@backend_list_option
@click.option("--batch", "batches", callback=_int_list, default="1,8", show_default=True, metavar="N[,N]",
              help="Batch sizes.")
@click.option("--threads", type=Count(1), help="Threads per backend [default: the backend's own].")
@click.option("--warmup", type=Count(0), default=5, show_default=True, help="Untimed runs per configuration.")
@click.option("--runs", type=Count(1), default=50, show_default=True,
              help="Timed rounds; each round runs every configuration once.")
@arch_option
@click.option("--input-size", callback=_size, metavar="HxW", help="For a checkpoint MODEL (see export-pose).")
@trust_option
@click.option("--json", "json_out", metavar="OUT", help="Also write the results as JSON (- for standard output).")
def bench_cmd(models, device, backends, batches, threads, warmup, runs, arch, input_size, trust_pickle, json_out):
    """Latency, throughput and memory of ONNX models (fp32 or INT8) and checkpoints on every backend."""
    from posequant.benchmarks.latency import bench, format_bench

    _check({"--json": json_out}, {**{f"MODEL {i + 1}" if len(models) > 1 else "MODEL": m for i, m in enumerate(models)},
            "--arch": arch_file(arch)})
    export_options = dict(arch=arch, input_size=input_size, trust_pickle=trust_pickle)
    result = bench(models, device=device, backends=backends, batches=batches, threads=threads, warmup=warmup,
                   runs=runs, export_options=export_options, progress=_progress)
    _echo(format_bench(result), json_out)
    _write_json(json_out, result.to_dict())


@main.command("gate")
@click.option("--float", "float_model", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="F.onnx", help="The float model (posequant export).")
@click.option("--int8", "int8_model", required=True, type=click.Path(dir_okay=False, path_type=Path),
              metavar="Q.onnx", help="Its quantized version.")
@click.option("--data", required=True, type=click.Path(path_type=Path), metavar="ROOT", help="MPII or COCO dataset root.")
@click.option("--max-drop", type=DROP, default=0.5, show_default=True,
              help="Largest allowed drop of the main metric, in points (COCO AP x 100, MPII PCKh@0.5).")
@click.option("--max-joint-drop", type=DROP, default=2.0, show_default=True,
              help="Largest allowed drop per joint group (head, shoulder, ... ankle), in points of PCK/PCKh.")
@click.option("--min-speedup", type=SPEEDUP, default=1.5, show_default=True,
              help="INT8 must be at least this many times faster than float (median, batch 1).")
@click.option("--min-agreement", type=AGREEMENT, metavar="OKS",
              help="Also require the INT8 keypoints to agree with the float ones this well (OKS with the float "
                   "model as ground truth, 0-1; always reported). Steadier than AP on a few dozen people.")
@device_option
@backend_option(default=None, help="Backend both models are evaluated and timed on "
                                   "[default: ort; openvino for .xml IRs, tensorrt for .engine files].")
@click.option("--split", help="Split to evaluate [default: MPII valid, COCO val].")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Flip test (official).")
@click.option("--limit", type=Count(1), help="Only the first N people (a quick look, not a release gate).")
@detector_options(DET_SCORE_EVAL, "Also check AP on these person boxes (COCO detection results), end to end: both "
                                  "models on the same boxes, within --max-drop.")
@click.option("--threads", type=Count(1), help="Threads per backend [default: the backend's own].")
@click.option("--runs", type=Count(1), default=30, show_default=True, help="Timed rounds.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), metavar="DIR",
              help="Write report.md, report.json and disagreements.png here.")
@click.option("--allow-different-source", is_flag=True,
              help="Gate models whose metadata differ in source checkpoint (source_sha256) or preprocessing "
                   "(colour, mean/std, flip pairs, heatmap size): refused otherwise.")
@click.option("--json", "json_out", metavar="OUT", help="Also write the result as JSON (- for standard output).")
def gate_cmd(float_model, int8_model, data, max_drop, max_joint_drop, min_speedup, min_agreement, device, backend,
             split, flip, limit, boxes, detector, det_score, det_iou, threads, runs, report_dir, allow_different_source, json_out):
    """Pass (exit 0) or fail (exit 1) an INT8 model against its float original: accuracy and speed."""
    from posequant.benchmarks.gate import gate
    from posequant.benchmarks.gate_report import REPORT_FILES, append_step_summary, check_step_summary, format_gate

    _check({"--json": json_out, "--report/": (report_dir, REPORT_FILES) if report_dir else None},
           {"--float": float_model, "--int8": int8_model, "--data": data, "--boxes": boxes, "--detector": detector})
    check_step_summary()  # before the run
    result = gate(float_model, int8_model, data, max_drop=max_drop, max_joint_drop=max_joint_drop,
                  min_speedup=min_speedup, min_agreement=min_agreement, device=device, backend=backend, split=split,
                  flip=flip, limit=limit, boxes=boxes, detector=detector, det_score=det_score, det_iou=det_iou,
                  threads=threads, runs=runs, report_dir=report_dir, allow_different_source=allow_different_source,
                  progress=_progress)
    _echo(format_gate(result), json_out)
    _write_json(json_out, result.to_dict())
    if append_step_summary(result):  # on GitHub Actions: the summary on the run's page
        _progress("appended the gate summary to $GITHUB_STEP_SUMMARY")
    sys.exit(0 if result.passed else 1)


def _warn(msg: str) -> None:
    click.echo(f"warning: {msg}", err=True)


def _next_commands(result) -> str:
    """What to run on the INT8 model next: evaluate it, then gate it against the float model."""
    import shlex

    from posequant.calibration.quantize import heldout_hint

    c = result.calibration
    data = result.settings["val"] or (c["root"] if c["format"] in ("mpii", "coco") else "VAL_ROOT")
    q = shlex.quote
    split, note = heldout_hint(result)  # never hint at scoring on the calibration people
    return (f"next: posequant eval {q(str(result.output))} --data {q(str(data))}{split}\n"
            f"      posequant gate --float {q(str(result.input))} --int8 {q(str(result.output))} --data {q(str(data))}"
            f"{split}" + (f"\n{note}" if note else ""))


@main.command("quantize")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", required=True, type=click.Path(path_type=Path), metavar="ROOT",
              help="Calibration data: MPII, COCO (person crops as evaluation makes them) or a folder of images.")
@click.option("--format", "fmt", type=click.Choice(["mpii", "coco", "folder"]), help="Layout of --calib [default: detected].")
@click.option("--split", help="Calibration split [default: MPII train, COCO train, else the one there is].")
@click.option("--num-samples", type=Count(1), default=300, show_default=True,
              help="People drawn (with --seed) for calibration; all of them when there are fewer.")
@click.option("--method", type=click.Choice(["auto", "minmax", "entropy", "percentile"]), default="auto",
              show_default=True, help="Activation range estimation (entropy needs --engine ort).")
@click.option("--per-channel/--per-tensor", default=True, show_default=True, help="Weight scales per output channel.")
@click.option("--seed", type=Count(0), default=0, show_default=True, help="Seed for drawing the calibration people.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="INT8 ONNX file to write [default: MODEL.int8.onnx].")
@backend_option(name="--target", help="Runtime the QDQ graph is shaped for.")
@click.option("--rewrite-deconv/--no-rewrite-deconv", default=None,
              help="Rewrite stride-s ConvTranspose as exact convolutions + DepthToSpace (int8 on ORT; per-channel "
                   "weight scales for depthwise ones) [default: on for ort and tensorrt; grouped (depthwise) "
                   "ones only for openvino, which runs dense ones in int8].")
@click.option("--equalize/--no-equalize", default=True, show_default=True,
              help="Even out the channel ranges of ReLU activations before quantizing (exact in float).")
@click.option("--activations", type=click.Choice(["asymmetric", "symmetric"]),
              help="Activation ranges [default: asymmetric for --target ort, symmetric for openvino].")
@click.option("--engine", type=click.Choice(["nncf", "ort"]), default="nncf", show_default=True,
              help="Quantizer: NNCF, or ONNX Runtime's quantize_static.")
@click.option("--val", type=click.Path(path_type=Path), metavar="ROOT",
              help="MPII or COCO data with ground truth: evaluate float and INT8, keep nodes in float until within --max-drop.")
@click.option("--val-split", help="Validation split [default: MPII valid, COCO val].")
@click.option("--max-drop", type=DROP, default=0.5, show_default=True,
              help="Largest allowed drop with --val, in points of the main metric (COCO AP x 100, MPII PCKh@0.5 Mean).")
@click.option("--flip/--no-flip", default=False, show_default=True, help="Flip test in the --val evaluation.")
@click.option("--min-agreement", type=AGREEMENT, metavar="OKS",
              help="Also keep nodes in float until the INT8 keypoints agree with the float ones this well (OKS with "
                   "the float model as ground truth, 0-1), on --val's people or on --agreement-on's.")
@click.option("--agreement-on", type=click.Path(path_type=Path), metavar="FOLDER",
              help="People for --min-agreement without --val: MPII, COCO or a plain folder of images (whole images; "
                   "labels unused).")
@click.option("--keep-float", multiple=True, metavar="NODE", help="Leave this node in float (repeatable).")
@click.option("--cpu", type=click.Choice(["auto", "portable", *CPU_KINDS]),
              default="auto", show_default=True,
              help="CPU kind the model will run on: auto is this machine's. For avx2/avx512 (no VNNI), whose int8 "
                   "kernels add products in saturating int16 pairs, and for portable, weight scales are fitted so "
                   "that no pair can saturate: exact on every CPU.")
@click.option("--input-size", callback=_size, metavar="HxW", help="For a model without posequant metadata.")
@click.option("--keypoints", type=click.Choice(["mpii", "coco"], case_sensitive=False),
              help="For a model without posequant metadata.")
@click.option("--color", type=click.Choice(["rgb", "bgr"], case_sensitive=False),
              help="For a model without posequant metadata.")
@click.option("--report", metavar="OUT.md", help="Also write a Markdown report.")
@click.option("--json", "json_out", metavar="OUT", help="Also write the result as JSON (- for standard output).")
def quantize_cmd(model, calib, fmt, split, num_samples, method, per_channel, seed, output, target, rewrite_deconv,
                 equalize, activations, engine, val, val_split, max_drop, flip, min_agreement, agreement_on, keep_float,
                 cpu, input_size, keypoints, color, report, json_out):
    """Static INT8 (QDQ) quantization calibrated on real person crops, with an optional accuracy budget."""
    from posequant.calibration.qreport import format_quantize, quantize_report_markdown
    from posequant.calibration.quantize import BudgetError, default_output, quantize

    _check({"-o": output or default_output(model), "--report": report, "--json": json_out},  # before the run
           {"MODEL": model, "--calib": calib, "--val": val, "--agreement-on": agreement_on})
    failure = None
    try:
        result = quantize(
            model, calib, output=output, format=fmt, split=split, num_samples=num_samples, method=method,
            per_channel=per_channel, seed=seed, target=target, rewrite_deconv=rewrite_deconv, equalize=equalize,
            activations=activations, engine=engine, val=val, val_split=val_split, max_drop=max_drop, val_flip=flip,
            min_agreement=min_agreement, agreement_on=agreement_on, keep_float=keep_float, cpu=cpu,
            input_size=input_size, keypoints=keypoints, color=color, progress=_progress, warn=_warn)
    except BudgetError as e:  # the summary and the report explain the failure; the model is not written
        result, failure = e.result, e
    _echo(format_quantize(result), json_out)
    if report:
        write_text_atomic(report, quantize_report_markdown(result), "--report")
        _echo(f"wrote {report}", json_out)
    payload = result.to_dict()
    if failure:
        payload.update(output=None, error=str(failure))
    _write_json(json_out, payload)
    if failure:
        raise failure
    _echo(_next_commands(result), json_out)


@main.command("pipeline")
@click.argument("checkpoint", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--calib", required=True, type=click.Path(path_type=Path), metavar="ROOT",
              help="Calibration data: MPII, COCO (its train split) or a folder of images.")
@click.option("--val", required=True, type=click.Path(path_type=Path), metavar="ROOT",
              help="MPII or COCO data with ground truth for the gate (its val split).")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("pipeline-out"),
              show_default=True, help="Folder for every file the pipeline writes.")
@arch_option
@click.option("--input-size", callback=_size, metavar="HxW", help="Input height x width (see export-pose).")
@click.option("--keypoints", type=click.Choice(["mpii", "coco"], case_sensitive=False), help="See export-pose.")
@click.option("--color", type=click.Choice(["rgb", "bgr"], case_sensitive=False), help="See export-pose.")
@trust_option
@click.option("--num-samples", type=Count(1), default=300, show_default=True, help="Calibration people.")
# no tensorrt: the pipeline's gate runs on the CPU (TensorRT needs --device cuda, which gate and eval take)
@backend_option(("ort", "openvino"), name="--target",
                help="Runtime the INT8 graph is shaped for, and the backend the gate evaluates and times on.")
@click.option("--max-drop", type=DROP, default=0.5, show_default=True, help="See gate.")
@click.option("--max-joint-drop", type=DROP, default=2.0, show_default=True, help="See gate.")
@click.option("--min-speedup", type=SPEEDUP, default=1.5, show_default=True, help="See gate.")
@click.option("--flip/--no-flip", default=True, show_default=True, help="Flip test in the gate's evaluation.")
@click.option("--runs", type=Count(1), default=30, show_default=True, help="Timed rounds in the gate.")
def pipeline_cmd(checkpoint, calib, val, out_dir, arch, input_size, keypoints, color, trust_pickle, num_samples,
                 target, max_drop, max_joint_drop, min_speedup, flip, runs):
    """Export, quantize and gate a checkpoint in one go; exit 1 when the INT8 model fails the gate."""
    from posequant.pipeline import GateBudget, format_pipeline, run_pipeline

    result = run_pipeline(checkpoint, calib, val, out_dir, arch=arch, input_size=input_size, keypoints=keypoints,
                          color=color, trust_pickle=trust_pickle, num_samples=num_samples, target=target,
                          budget=GateBudget(max_drop, max_joint_drop, min_speedup), flip=flip, runs=runs,
                          progress=_progress)
    click.echo(format_pipeline(result))
    sys.exit(0 if result.passed else 1)


@main.command("predict")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path), metavar="IMAGE|FOLDER|VIDEO...")
@detector_options(DET_SCORE_PREDICT,
                  "Person boxes: COCO detection results (image_id or file_name, bbox, score); file_name matches "
                  "an image's file name, image_id the number in it (000000000139.jpg is 139) [default: each "
                  "image is one person, unless --detector].")
@click.option("--min-score", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Leave out boxes (--boxes or --detector's) scoring below this.")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("predict-out"),
              show_default=True, help="Folder for keypoints.json, the pictures and videos.")
@backend_option(default=None, help="Runtime the model runs on [default: ort; openvino for an .xml, tensorrt for an "
                                   ".engine].")
@device_option
@click.option("--flip/--no-flip", default=True, show_default=True, help="Flip test (as eval).")
@click.option("--compare", type=click.Path(dir_okay=False, path_type=Path), metavar="OTHER_MODEL",
              help="Also run this model (e.g. the INT8 one) and draw both side by side.")
@click.option("--json", "json_out", metavar="OUT", help="Also write the result as JSON (- for standard output).")
def predict_cmd(model, inputs, boxes, detector, det_score, det_iou, min_score, out_dir, backend, device, flip, compare,
                json_out):
    """Keypoints of a model on images, folders and videos (one skeleton per person --detector finds): COCO
    results JSON and overlay pictures in OUT/."""
    from posequant.benchmarks.predict import format_predict, planned_files, predict

    _check({"--json": json_out, "-o/": (out_dir, planned_files(inputs, compare))},  # --json not one of OUT/'s files
           {"MODEL": model, "--boxes": boxes, "--detector": detector, "--compare": compare}
           | {str(p): p for p in inputs})
    result = predict(model, inputs, out_dir, boxes=boxes, min_score=min_score, detector=detector, det_score=det_score,
                     det_iou=det_iou, backend=backend, device=device, flip=flip, compare=compare, warn=_warn)
    _echo(format_predict(result), json_out)
    _write_json(json_out, result.to_dict())


@main.command("convert")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--to", "to", required=True, type=Names(("openvino", "tensorrt")), help="Deployment format.")
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="OUT",
              help="The .xml (or a folder for it) / the .engine [default: beside MODEL].")
@click.option("--compress-weights", type=click.Choice(["fp16"]), help="OpenVINO: store float weights as fp16.")
@click.option("--fp16", is_flag=True, help="TensorRT: allow fp16 kernels (a float MODEL).")
@click.option("--json", "json_out", metavar="OUT", help="Also write the result as JSON (- for standard output).")
def convert_cmd(model, to, output, compress_weights, fp16, json_out):
    """An ONNX model (float or INT8) as an OpenVINO IR or a TensorRT engine, with its posequant metadata."""
    import shlex

    from posequant.exporter.convert import convert

    _check({"--json": json_out}, {"MODEL": model})
    res = convert(model, to, output=output, compress_weights=compress_weights, fp16=fp16)
    _echo(f"wrote {res.output} + {res.companion.name} ({res.to}, {res.precision}, {res.output_mb:.1f} MB; "
          f"{res.input.name} {res.input_mb:.1f} MB)\nnext: posequant eval {shlex.quote(str(res.output))} --data ROOT",
          json_out)
    _write_json(json_out, res.to_dict())


@main.command("demo")
@click.option("-o", "--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("demo-out"),
              show_default=True, help="Folder for the demo's files.")
@click.option("--shared", type=click.Path(file_okay=False, path_type=Path),
              help="A shared/ folder with the trained ultralight-simplepose model and coco-mini data.")
def demo_cmd(out_dir, shared):
    """Run the pipeline on a built-in default (the trained model when --shared has it); exit 1 on a failed gate."""
    from posequant.demo import run_demo

    result = run_demo(out_dir, shared, echo=click.echo, progress=_progress)
    sys.exit(0 if result.passed else 1)
