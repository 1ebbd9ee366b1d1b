"""Human-readable text for inspect and export results."""

from __future__ import annotations

from posequant.core.metadata import format_size
from posequant.core.table import format_table

from .export import ExportResult
from .inspect import CheckpointInfo


def _fmt_config(cfg: dict) -> list[str]:
    lines = []
    for key, value in cfg.items():
        if key == "stages":
            for n, st in enumerate(value, start=2):
                lines.append(f"  stage{n}: {st['num_modules']} module(s), {st['block'].lower()} blocks "
                             f"{list(st['num_blocks'])}, channels {list(st['num_channels'])}")
        else:
            lines.append(f"  {key}: {list(value) if isinstance(value, (list, tuple)) else value}")
    return lines


def format_inspect(info: CheckpointInfo) -> str:
    lines = [
        f"checkpoint   {info.path}",
        f"sha256       {info.sha256}",
        f"stored as    {info.container}" + (f" (prefix '{info.stripped_prefix}' removed)" if info.stripped_prefix else ""),
        f"architecture {info.name} ({info.family})",
        f"parameters   {info.num_parameters:,} ({info.num_tensors} tensors in the state_dict)",
    ]
    if info.num_joints:
        lines.append(f"joints       {info.num_joints}")
    if info.default_input_size:
        lines.append(f"input        {format_size(info.default_input_size)} by default, {info.color.upper()}, "
                     f"mean {tuple(round(m, 4) for m in info.mean)}, std {tuple(round(s, 4) for s in info.std)}")
    if info.arch_config:
        lines.append("config")
        lines += _fmt_config(info.arch_config)
    return "\n".join(lines)


def format_verification(result: ExportResult) -> str:
    report = result.verification
    if report is None:
        return "verification skipped (--no-verify)"
    rows = []
    for c in report.cases:
        agree = sum(round(a * c.samples) for a in c.joint_agreement)
        total = c.samples * len(c.joint_agreement)
        rows.append([c.name, c.samples, f"{c.max_abs_diff:.2e}", f"{c.rel_diff:.2e}",
                     f"{agree}/{total} ({100 * agree / total:.1f}%)", c.argmax_mismatches])
    out = [f"verification: ONNX Runtime (CPU) vs {report.reference}, tolerance {report.rtol:g} of the output's max",
           format_table(["inputs", "samples", "max abs diff", "rel diff", "argmax agree", "mismatches"], rows)]
    m = result.meta  # the comparison is per output channel: a third-party model's channels are in its own order
    joints = [m.joint_names[j] for j in m.channel_joints] if m.channel_joints else m.joint_names
    per_joint = [[name] + [f"{100 * c.joint_agreement[j]:.0f}%" for c in report.cases]
                 for j, name in enumerate(joints)]
    out.append("per-joint argmax agreement")
    out.append(format_table(["joint"] + [c.name for c in report.cases], per_joint))
    out.append("PASS" if report.passed else "FAIL")
    return "\n".join(out)


def format_export(result: ExportResult) -> str:
    m = result.meta
    t = result.timings
    steps = ", ".join(f"{k[:-2]} {v:.1f}s" for k, v in t.items())
    return "\n".join([
        format_verification(result),
        f"wrote {result.output} ({result.onnx_bytes / 2**20:.1f} MiB): {m.family}, {m.keypoints} "
        f"{m.num_joints} joints, input {format_size(m.input_size)} {m.color.upper()}, {m.output_text()}",
        f"time: {steps}",
    ])
