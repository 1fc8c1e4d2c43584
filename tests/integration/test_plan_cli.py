"""``kd plan`` end to end: the digits demo's tiny ViTs planned on 4 p4d-like nodes (tables,
assumptions, ``--json``), an instance shortcut, and one-line errors for unknown names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.integration.conftest import assert_one_line_user_error, kd_cli

SECTIONS = ("kd plan:", "memory per GPU", "student weights", "gradients", "optimizer state",
            "teacher weights", "activations per image", "largest batch per GPU",
            "time per optimizer step", "gradient all-reduce", "images/s",
            "input pipeline per GPU", "assumptions:")


def test_plan_the_demo_on_four_nodes(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = kd_cli("plan", "--gpu", "a100-40gb", "--nodes", "4", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    for section in SECTIONS:
        assert section in result.stdout, (section, result.stdout)
    assert "32 GPUs" in result.stdout and "ml.p4d.24xlarge" in result.stdout

    plan = json.loads(out.read_text())
    assert set(plan) == {"setup", "cluster", "measured", "memory", "time", "input",
                         "assumptions"}
    c, m = plan["cluster"], plan["measured"]
    assert (c["gpu"], c["nodes"], c["gpus_per_node"], c["world_size"]) == ("a100-40gb", 4, 8, 32)
    assert c["network_gbps"] == 400 and c["mfu"] == 0.4
    assert m["device"] == "cpu" and m["precision"] == "fp32"  # the demo preset trains in fp32
    assert m["student_params"] == m["trainable_params"] > 0 and m["teacher_params"] > 0
    assert m["optimizer"] == "adamw" and m["optimizer_bytes_per_param"] == pytest.approx(8, 0.01)
    plain, zero = plan["memory"]["without_zero"], plan["memory"]["with_zero"]
    assert plain["gradients"] == 4 * m["trainable_params"]
    assert zero["optimizer_state"] == pytest.approx(plain["optimizer_state"] / 32)
    assert plain["largest_batch"] > plan["setup"]["batch_size"] == 128  # tiny models fit
    t = plan["time"]["at_batch_size"]
    assert t["allreduce_bytes"] == pytest.approx(2 * 31 / 32 * plain["gradients"])
    assert t["images_per_step"] == 128 * 32
    # The input pipeline: digits are measured here (no JPEGs, so no device-decoding row).
    inp = plan["input"]
    assert inp["cpus_per_gpu"] == 12 and "measured here" in inp["rate_source"]
    assert [(r["teacher"], r["decode"]) for r in inp["rows"]] == [("live teacher", "cpu"),
                                                                  ("teacher cache", "cpu")]
    assert all(r["gpu_images_per_s"] > 0 and 0 < r["gpu_busy"] <= 1 for r in inp["rows"])
    # The numbers printed are the JSON's.
    assert f"{plain['largest_batch']:,}" in result.stdout
    assert f"{inp['rows'][0]['gpu_images_per_s']:,.0f}" in result.stdout
    assert len(plan["assumptions"]) >= 5 and all(a in result.stdout.replace("\n    ", " ")
                                                 for a in plan["assumptions"][:2])


def test_instance_shortcut_and_overrides(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = kd_cli("plan", "--instance", "p5", "--nodes", "2", "train.precision=bf16",
                    "data.batch_size=32", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(out.read_text())
    assert (plan["cluster"]["gpu"], plan["cluster"]["world_size"]) == ("h100", 16)
    assert plan["cluster"]["network_gbps"] == 3200
    assert plan["cluster"]["peak_flops"] == 989e12 and plan["setup"]["precision"] == "bf16"
    assert plan["time"]["at_batch_size"]["batch"] == 32


@pytest.mark.parametrize(("args", "mentions"), [
    (("--gpu", "a100"), ("--gpu a100", "a100-40gb, a100-80gb, h100, h200")),
    (("--instance", "p3", "--nodes", "2"), ("--instance p3", "p4d, p4de, p5")),
    ((), ("--gpu", "--instance")),
])
def test_unknown_names_are_one_line_errors(args: tuple[str, ...],
                                          mentions: tuple[str, ...]) -> None:
    assert_one_line_user_error(kd_cli("plan", *args), *mentions)
