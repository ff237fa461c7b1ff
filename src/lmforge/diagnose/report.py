"""The text report of `lmforge diagnose` (`format_diagnosis`): the verdict, the evidence with its
numbers and steps, the remedies and the limitations. `--json` prints `Diagnosis.to_dict()` instead.
"""

from __future__ import annotations

from lmforge.diagnose.rules import Diagnosis


def _trend(relative_fall: float) -> str:
    return f"fell {relative_fall:.1%}" if relative_fall >= 0 else f"rose {-relative_fall:.1%}"


def format_diagnosis(d: Diagnosis) -> str:
    """The human-readable report: verdict, evidence with numbers and steps, remedies, limitations."""
    e = d.evidence
    run, train, val, inst = e["run"], e.get("train_loss"), e.get("val_loss", {}), e.get("instability", {})
    lines = [f"run: {run.get('dir', '')} ({run['last_step']} steps"
             + (f" of {run['max_steps']}" if run.get("max_steps") else "")
             + (f", {run['stop_reason']}" if run.get("stop_reason")
                else ", no summary.json" if run.get("finished") is False else "")
             + (f", {run['epochs']:g} epochs" if run.get("epochs") else "") + ")",
             f"verdict: {d.verdict.replace('_', ' ').upper()} - {d.reason}", "evidence:"]
    if train:
        improvement = train["relative_improvement_last_quarter"]
        lines.append(f"  - train loss ({train['smoothing']}): {train['start']} at the first step, "
                     f"best {train['best']} at step {train['best_step']}, final {train['final']}; "
                     + (f"{_trend(improvement)} over the last quarter; " if improvement is not None else "")
                     + f"within {d.thresholds['plateau_rel']:.0%} of its final value from step {train['plateau_step']}")
    if val.get("evals"):
        lines.append(f"  - val loss: {val['evals']} evals, best {val['best']} at step {val['best_step']} "
                     f"(checkpoints/best), final {val['final']} at step {val['final_step']}"
                     + (f"; {_trend(val['relative_improvement_last_quarter'])} over the last quarter"
                        if val.get("relative_improvement_last_quarter") is not None else ""))
        if "gap_growth" in val and d.verdict != "not_converging":  # unstable curves make gaps meaningless
            lines.append(f"  - gap val - train ({val['train_at_evals']}): min {val['gap_min']:+.3f} at step "
                         f"{val['gap_min_step']}, final {val['gap_final']:+.3f}"
                         + (f", began to grow at step {val['gap_began_to_grow_step']}"
                            if val.get("gap_began_to_grow_step") else ""))
            lines.append(f"  - since val stopped improving (step {val['val_stopped_improving_step']}, within "
                         f"{d.thresholds['val_rise_nats']:g} nats/{d.thresholds['val_rise_rel']:.1%} of its best): gap "
                         f"grew {val['gap_growth']:.3f} from step {val['gap_growth_from_step']} (overfitting needs >= "
                         f"{val['gap_growth_needed']:.3f}), train fell {val['train_fall_since']:.3f}")
    else:
        lines.append("  - val loss: none logged")
    if inst:
        if inst.get("nonfinite_step") is not None:
            lines.append(f"  - non-finite values: {inst['nonfinite']} at step {inst['nonfinite_step']}")
        spikes = inst.get("loss_spikes", [])
        lines.append(f"  - loss spikes: {inst.get('loss_spike_count', 0)}"
                     + (" at steps " + ", ".join(str(s["step"]) for s in spikes[:8]) if spikes else ""))
        gs = inst.get("grad_norm_spikes", [])
        if inst.get("grad_norm_median") is not None:
            lines.append(f"  - gradient norm: median {inst['grad_norm_median']}; "
                         f"{inst.get('grad_norm_spike_count', 0)} spikes "
                         f"(> {d.thresholds['grad_spike_ratio']:g}x the running median)"
                         + (": " + ", ".join(f"step {s['step']} {s['grad_norm']} ({s['x_median']}x)" for s in gs[:5])
                            if gs else ""))
    ref = e.get("reference")
    if ref:
        if ref.get("kind") == "target":
            lines.append(f"  - reference: target loss {ref['loss']}; {ref['compared']} {ref['model_loss']} "
                         f"({ref['ratio']:.2f}x)")
        else:
            lines.append(f"  - reference: a bigram model of the train split reaches {ref['bigram_val_loss']} on val "
                         f"(unigram {ref['unigram_val_loss']}, uniform {ref['uniform_loss']}); {ref['compared']} "
                         f"{ref['model_loss']} ({ref['ratio']:.2f}x)")
    lines.append("remedies:")
    lines += [f"  - {r}" for r in d.remedies]
    if d.limitations:
        lines.append("limitations:")
        lines += [f"  - {x}" for x in d.limitations]
    return "\n".join(lines)
