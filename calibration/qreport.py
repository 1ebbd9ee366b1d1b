"""Human-readable text for quantize results: a terminal summary and a Markdown report.

The JSON form is ``QuantizeResult.to_dict()``; both texts below are built from the same fields.
"""

from __future__ import annotations

import math
from typing import Any

from posequant.core.metadata import format_size
from posequant.core.table import format_table

AGREEMENT = "agreement"  # quantize.AGREEMENT: an evaluation of the agreement alone


def _budget(result):
    from .quantize import Budget

    s = result.settings
    return Budget(s.get("max_drop"), s.get("min_agreement"))


def budget_met(result) -> bool | None:
    """True/False when an accuracy budget was checked (``--val``, ``--min-agreement``), None otherwise."""
    if result.evaluation is None:
        return None
    return _budget(result).met(result.evaluation)


def _where(result) -> str:
    s = result.settings
    return s.get("val") or s.get("agreement_on") or "?"


def summary_rows(evaluation) -> list[tuple[str, float, float]]:
    """(metric, float, INT8) in points: COCO AP, AP50, AP75, AR (x 100) and PCK@0.2 Mean; MPII PCKh@0.5 and @0.1 Mean."""
    f, q = evaluation.float_metrics, evaluation.int8_metrics
    if "AP" in f:
        rows = [(k, 100.0 * f[k], 100.0 * q[k]) for k in ("AP", "AP50", "AP75", "AR")]
        keys = ("PCK@0.2",)
    else:
        rows, keys = [], ("PCKh@0.5", "PCKh@0.1")
    return rows + [(f"{k} Mean", f[k]["Mean"], q[k]["Mean"]) for k in keys if k in f]


def joint_rows(evaluation) -> tuple[str, list[tuple[str, float, float]]]:
    """Per joint (COCO: PCK@0.2 of each keypoint) or per joint group (MPII: PCKh@0.5), float and INT8."""
    f, q = evaluation.float_metrics, evaluation.int8_metrics
    key = "PCK@0.2" if "PCK@0.2" in f else "PCKh@0.5"
    return key, [(name, value, q[key][name]) for name, value in f[key].items()]


def agreement_line(agreement: dict[str, float]) -> str:
    """INT8 vs float keypoints in one line (``benchmarks.metrics.agreement_line``; imported here, not at the
    top: the calibration stage does not load the benchmarks stage to quantize)."""
    from posequant.benchmarks.metrics import agreement_line as line

    return line(agreement)


def _oks(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _num(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


def _drop(a: float, b: float) -> str:
    return _num(a - b if a is not None and b is not None else None)


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _rewrite(value: bool | str) -> str:
    """An on/off setting; the rewrite's "grouped" (only grouped deconvolutions) says so."""
    return {True: "on", False: "off", "grouped": "grouped (depthwise) only"}.get(value, str(value))


def _settings_line(s: dict[str, Any]) -> str:
    granularity = "per-channel" if s["per_channel"] else "per-tensor"
    return (f"engine {s['engine']}, method {s['method']}, weights {s['weights']} {granularity}, activations "
            f"{s['activations']}, target {s['target']}, deconvolution rewrite {_rewrite(s['rewrite_deconv'])}, "
            f"ReLU range equalization {_rewrite(s.get('equalize', False))}, "
            f"seed {s['seed']}" + (f", bias correction {s['bias_correction']}" if s.get("bias_correction") else "")
            # NNCF's full correction gives up part-way on some graphs (its bar stops, hidden without --verbose)
            + (" (NNCF's full bias correction cannot cut this graph into sub-graphs)"
               if s.get("bias_correction") == "fast" else ""))


def cpu_line(s: dict[str, Any]) -> str:
    """Which CPU kind the graph was made for, what that changed, and where it is exact."""
    made_for = s.get("cpu", "portable")
    line = f"made for {made_for} ({s.get('cpu_title', '')}; quantized on {s.get('quantized_on', '?')})"
    fit = s.get("pair_fit")
    if fit is not None:
        line += (f": weight scales fitted on {fit['channels_rescaled']} of {fit['channels']} channels so that no int16 "
                 f"pair sum can saturate (coarsest {fit['coarsest_bits']:.1f} bits)")
    return line + f"; exact on {s.get('exact_on', '?')}"


def _calibration_line(c: dict[str, Any]) -> str:
    where = c["format"].upper() + (f" {c['split']}" if c.get("split") else "")
    line = f"{c['people']} of {c['available_people']} people from {where} ({c['root']}), seed {c['seed']}"
    if c["skipped_images"]:
        line += f"; {len(c['skipped_images'])} image(s) skipped (missing or undecodable)"
    return line


def _prepared_line(result) -> str:
    parts = []
    if result.folded_batchnorms:
        parts.append(f"{len(result.folded_batchnorms)} BatchNorm folded into ConvTranspose")
    if result.rewritten_deconvs:
        parts.append(f"{len(result.rewritten_deconvs)} ConvTranspose rewritten as convolutions + DepthToSpace")
    if result.equalized:
        parts.append(f"{len(result.equalized)} ReLU tensors' channel ranges equalized")
    if result.rewrite_max_rel_diff is not None:
        parts.append(f"max rel diff {result.rewrite_max_rel_diff:.1e}")
    return ", ".join(parts) if parts else "no ConvTranspose changes"


def _outcome(result) -> str:
    met = budget_met(result)
    if met is False:
        e = result.evaluation
        return (f"FAIL: INT8 {_budget(result).miss(e)} with {len(result.kept_float)} node(s) in float; "
                "nothing written")
    return f"wrote {result.output}"


def format_quantize(result) -> str:
    """The terminal summary of a quantize run."""
    m = result.meta
    lines = [
        f"{result.input} -> {result.output}{' (not written)' if budget_met(result) is False else ''}: "
        f"{_bytes(result.float_bytes)} float, {_bytes(result.int8_bytes)} INT8, {result.seconds:.1f} s",
        f"  model        {m.keypoints} {m.num_joints} joints, input {format_size(m.input_size)} {m.color.upper()}",
        f"  settings     {_settings_line(result.settings)}",
        f"  calibration  {_calibration_line(result.calibration)}",
        f"  graph        {_prepared_line(result)}",
        f"  cpu          {cpu_line(result.settings)}",
        "  deconvs      " + "; ".join(f"{backend}: {how}" for backend, how in result.deconvs.items()),
        "  in float     " + _short_list(result.kept_float),
    ]
    e = result.evaluation
    if e is None:
        lines.append("accuracy not measured (give --val ROOT to measure it and enforce --max-drop)")
    else:
        flip = "on" if result.settings.get("val_flip") else "off"
        what = "agreement" if e.metric == AGREEMENT else f"accuracy ({e.metric})"
        lines.append(f"{what} on {e.people} people of {_where(result)} (flip {flip}), "
                     f"budget {_budget(result).describe()}:")
        if e.metric != AGREEMENT:
            lines.append(format_table(["metric", "float", "INT8", "drop"],
                                      [[k, _num(a), _num(b), _drop(a, b)] for k, a, b in summary_rows(e)]))
        if e.agreement:
            lines.append(agreement_line(e.agreement))
        if len(result.budget_steps) > 1:
            lines.append("budget steps")
            lines.append(format_table(["step", "nodes in float", "INT8", "drop", "agreement"],
                                      _step_rows(result.budget_steps)))
    lines.append(_outcome(result))
    return "\n".join(lines)


def _short_list(names: list[str], shown: int = 4) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - shown} more (see --report)" if len(names) > shown else ""
    return f"{len(names)} node(s): " + ", ".join(names[:shown]) + more


def _step_rows(steps: list[dict[str, Any]]) -> list[list[str]]:
    return [[str(i), str(len(s["kept_float"])), _num(s["int8"]), f"{s['drop']:.2f}", _oks(s.get("agreement"))]
            for i, s in enumerate(steps)]


# ---- Markdown ----------------------------------------------------------------------------------


def _md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _code_list(names: list[str] | tuple[str, ...]) -> str:
    return ", ".join(f"`{n}`" for n in names) if names else "none"


def quantize_report_markdown(result) -> str:
    """The Markdown report of a quantize run: calibration, settings, sizes, accuracy, float nodes, deconvolutions."""
    s, c, m = result.settings, result.calibration, result.meta
    out = [f"# INT8 quantization of `{result.input.name}`", "", f"**{_outcome(result)}**", ""]

    out += ["## Calibration set", "", _md_table(["", ""], [
        ["data", f"`{c['root']}`"],
        ["format / split", f"{c['format']} / {c['split'] or '-'}"],
        ["people", f"{c['people']} of {c['available_people']} available (drawn with seed {c['seed']})"],
        ["skipped images", f"{len(c['skipped_images'])}: " + _code_list(c["skipped_images"])
         if c["skipped_images"] else "none"],
        ["people in skipped images", c["skipped_people"]],
    ]), ""]

    out += ["## Settings", "", _md_table(["setting", "value"], [
        ["engine", s["engine"]], ["method", s["method"]], ["weights", s["weights"] + (
            ", per-channel" if s["per_channel"] else ", per-tensor")],
        ["activations", s["activations"]], ["target runtime", s["target"]],
        ["deconvolution rewrite", _rewrite(s["rewrite_deconv"])],
        ["bias correction", s.get("bias_correction") or "-"],
        ["CPU kind", cpu_line(s)],
        ["calibration samples asked", s["num_samples"]], ["seed", s["seed"]],
        ["validation", f"`{s['val']}`, flip {'on' if s['val_flip'] else 'off'}" if s["val"] else "none"],
        ["max drop", f"{s['max_drop']} points" if s["max_drop"] is not None else "-"],
        ["min agreement", f"OKS {s['min_agreement']:g}" + (f" on `{s['agreement_on']}`" if s.get("agreement_on")
                                                              else "") if s.get("min_agreement") is not None else "-"],
    ]), ""]

    out += ["## Model", "", _md_table(["", "float", "INT8"], [
        ["file", f"`{result.input}`", f"`{result.output}`" if budget_met(result) is not False else "not written"],
        ["size", _bytes(result.float_bytes), _bytes(result.int8_bytes)],
    ]), "",
        f"{m.keypoints} {m.num_joints} joints, input {format_size(m.input_size)} {m.color.upper()}, "
        f"{m.output_text()}.", "",
        f"Float graph prepared before quantization: {_prepared_line(result)}.", "",
        f"- BatchNorm folded into: {_code_list(result.folded_batchnorms)}",
        f"- rewritten as convolutions + DepthToSpace: {_code_list(result.rewritten_deconvs)}",
        f"- ReLU outputs with equalized channel ranges: {_code_list(result.equalized)}", ""]

    out += ["## Deconvolutions in int8", "",
            _md_table(["backend", "deconvolutions run"], [[b, how] for b, how in result.deconvs.items()]), ""]

    out += _accuracy_md(result)

    out += ["## Nodes kept in float", ""]
    out += [f"- `{n}`" for n in result.kept_float] if result.kept_float else ["none"]
    out.append("")

    if result.budget_steps:
        out += ["## Budget steps", "", _md_table(["step", "nodes in float", "INT8", "drop", "agreement",
                                                  "added to float"], [
            [i, len(step["kept_float"]), _num(step["int8"]), f"{step['drop']:.2f}", _oks(step.get("agreement")),
             _code_list(sorted(
                set(step["kept_float"]) - set(result.budget_steps[i - 1]["kept_float"] if i else ())))]
            for i, step in enumerate(result.budget_steps)]), ""]
    return "\n".join(out)


def _accuracy_md(result) -> list[str]:
    e = result.evaluation
    if e is None:
        return ["## Accuracy", "", "Not measured: give `--val ROOT` to measure it and enforce `--max-drop`.", ""]
    s = result.settings
    met = "met" if budget_met(result) else "not met"
    if e.metric == AGREEMENT:
        return ["## Accuracy", "", f"{e.people} people of `{_where(result)}` (labels unused), flip "
                f"{'on' if s['val_flip'] else 'off'}; budget {_budget(result).describe()} ({met}).", "",
                agreement_line(e.agreement), ""]
    out = ["## Accuracy", "",
           f"{e.people} people of `{s['val']}`, flip {'on' if s['val_flip'] else 'off'}; budget "
           f"{_budget(result).describe()} of {e.metric}: float {e.float_value:.2f}, INT8 {e.int8_value:.2f}, "
           f"drop {e.drop:.2f} ({met}).", "",
           _md_table(["metric", "float", "INT8", "drop"],
                     [[k, _num(a), _num(b), _drop(a, b)] for k, a, b in summary_rows(e)]), ""]
    if e.agreement:
        out += [agreement_line(e.agreement), ""]
    key, rows = joint_rows(e)
    what = "joint" if key == "PCK@0.2" else "joint group"
    out += [f"### {key} per {what}", "",
            _md_table([what, "float", "INT8", "drop"], [[k, _num(a), _num(b), _drop(a, b)] for k, a, b in rows]), ""]
    return out
