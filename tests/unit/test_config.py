"""Unit tests for kd.config: merge order, `_base_` chains, validation and the CLI's error path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from kd.config import (
    CHOICES,
    DEMO_PRESET,
    ConfigOrigins,
    KDConfig,
    iter_fields,
    load_command_config,
    load_config,
    reference_markdown,
    to_container,
)
from kd.errors import ConfigError
from tests.conftest import run_kd


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


DEFAULTS = to_container(OmegaConf.structured(KDConfig))

# A valid base for tests that are about one value only (the schema's defaults need data.root).
SYNTH = ["data.name=synthetic"]


# ------------------------------------------------------------------------------------------
# merge order
# ------------------------------------------------------------------------------------------


def test_defaults_without_preset_are_the_schema_defaults() -> None:
    cfg = to_container(load_config(None, SYNTH))
    expected = {**DEFAULTS, "data": {**DEFAULTS["data"], "name": "synthetic"}}
    assert cfg == expected


def test_merge_order_defaults_then_preset_then_overrides(tmp_path: Path) -> None:
    preset = write(tmp_path / "p.yaml", "data: {name: synthetic, num_classes: 4}\n"
                                        "train: {epochs: 3, log_every: 7}\n")
    cfg = load_config(preset, ["train.epochs=5", "distill.temperature=2"])
    assert cfg.train.epochs == 5  # override beats preset
    assert cfg.train.log_every == 7  # preset beats default
    assert cfg.data.num_classes == 4
    assert cfg.distill.temperature == 2.0  # override beats default
    assert cfg.optim.lr == DEFAULTS["optim"]["lr"]  # untouched default
    assert cfg.train.grad_accum_steps == DEFAULTS["train"]["grad_accum_steps"]


def test_later_override_of_the_same_key_wins() -> None:
    cfg = load_config(None, [*SYNTH, "train.epochs=3", "train.epochs=4"])
    assert cfg.train.epochs == 4


def test_override_values_are_parsed_as_yaml() -> None:
    cfg = load_config(None, [*SYNTH, "student.mean=[0.1,0.2,0.3]", "train.max_steps=null",
                             "student.kwargs.depth=2", "distill.alpha=0.25"])
    assert list(cfg.student.mean) == pytest.approx([0.1, 0.2, 0.3])
    assert cfg.train.max_steps is None
    assert cfg.student.kwargs == {"depth": 2}
    assert cfg.distill.alpha == 0.25


def test_demo_preset_loads_as_documented() -> None:
    cfg = load_config(DEMO_PRESET, ["train.epochs=2", "distill.loss=hard"])
    assert (cfg.data.name, cfg.train.epochs, cfg.distill.loss) == ("digits", 2, "hard")
    assert cfg.data.num_classes == 10
    assert cfg.teacher.checkpoint == "kd://assets/digits_teacher.safetensors"


def test_empty_preset_gives_defaults(tmp_path: Path) -> None:
    preset = write(tmp_path / "empty.yaml", "# nothing\n")
    assert to_container(load_config(preset, SYNTH)) == to_container(load_config(None, SYNTH))


# ------------------------------------------------------------------------------------------
# _base_ chains
# ------------------------------------------------------------------------------------------


def test_base_relative_to_the_preset_and_child_wins(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "data: {name: synthetic, num_classes: 4}\n"
                               "train: {epochs: 3, log_every: 5}\n")
    child = write(tmp_path / "sub" / "b.yaml", "_base_: ../a.yaml\ntrain: {epochs: 7}\n")
    cfg = load_config(child, ["train.log_every=9"])
    assert cfg.train.epochs == 7  # child beats base
    assert cfg.data.num_classes == 4  # inherited from base
    assert cfg.train.log_every == 9  # override beats both


def test_base_chain_of_three(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "data: {name: synthetic}\nseed: 1\ntrain: {epochs: 2}\n")
    write(tmp_path / "b.yaml", "_base_: a.yaml\nseed: 2\noptim: {lr: 0.5}\n")
    c = write(tmp_path / "c.yaml", "_base_: b.yaml\nseed: 3\n")
    cfg = load_config(c)
    assert (cfg.seed, cfg.optim.lr, cfg.train.epochs, cfg.data.name) == (3, 0.5, 2, "synthetic")


def test_base_kd_path_inside_the_package(tmp_path: Path) -> None:
    child = write(tmp_path / "mine.yaml", "_base_: kd://presets/demo.yaml\ntrain: {epochs: 1}\n")
    cfg = load_config(child)
    demo = load_config(DEMO_PRESET)
    assert cfg.train.epochs == 1
    assert cfg.data.name == "digits"
    assert to_container(cfg.teacher) == to_container(demo.teacher)
    assert cfg.train.log_every == demo.train.log_every


def test_repo_demo_config_equals_embedded_preset() -> None:
    repo_demo = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    assert to_container(load_config(repo_demo)) == to_container(load_config(DEMO_PRESET))


@pytest.mark.parametrize("files", [
    {"self.yaml": "_base_: self.yaml\n"},
    {"self.yaml": "_base_: loop2.yaml\n", "loop2.yaml": "_base_: self.yaml\n"},
    {"self.yaml": "_base_: b.yaml\n", "b.yaml": "_base_: c.yaml\n", "c.yaml": "_base_: b.yaml\n"},
], ids=["self", "two", "three"])
def test_base_loop_is_detected(tmp_path: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        write(tmp_path / name, text)
    with pytest.raises(ConfigError, match="loops back"):
        load_config(str(tmp_path / "self.yaml"))


def test_base_missing_file(tmp_path: Path) -> None:
    child = write(tmp_path / "c.yaml", "_base_: nothere.yaml\n")
    with pytest.raises(ConfigError, match=r"nothere\.yaml"):
        load_config(child)


def test_base_must_be_a_single_path(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", "seed: 1\n")
    child = write(tmp_path / "c.yaml", "_base_: [a.yaml]\n")
    with pytest.raises(ConfigError, match="_base_"):
        load_config(child)


# ------------------------------------------------------------------------------------------
# errors: unknown keys, types, values, files
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key, suggestion", [
    ("train.epoch=3", "train.epoch", "train.epochs"),
    ("trian.epochs=3", "trian", "train"),
    ("distill.temprature=2", "distill.temprature", "distill.temperature"),
    ("data.batchsize=8", "data.batchsize", "data.batch_size"),
])
def test_unknown_key_names_it_and_suggests_the_closest(override: str, key: str,
                                                       suggestion: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*SYNTH, override])
    msg = str(info.value)
    assert f"'{key}'" in msg
    assert f"did you mean '{suggestion}'?" in msg


def test_unknown_key_in_a_preset_names_the_file(tmp_path: Path) -> None:
    preset = write(tmp_path / "p.yaml", "train: {epoch: 3}\n")
    with pytest.raises(ConfigError) as info:
        load_config(preset)
    assert preset in str(info.value)
    assert "'train.epoch'" in str(info.value)
    assert "did you mean 'train.epochs'?" in str(info.value)


@pytest.mark.parametrize("override, key", [
    ("train.epochs=abc", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("distill.alpha=abc", "distill.alpha"),
    ("seed=[1]", "seed"),
    ("student.kwargs=3", "student.kwargs"),
    ("train=3", "train"),
])
def test_wrong_type_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*SYNTH, override])
    assert f"'{key}'" in str(info.value)
    assert "\n" not in str(info.value)


def test_section_given_a_value_in_a_preset(tmp_path: Path) -> None:
    preset = write(tmp_path / "p.yaml", "train: 3\n")
    with pytest.raises(ConfigError, match="'train' is a section"):
        load_config(preset, SYNTH)


@pytest.mark.parametrize("overrides, key", [
    (["distill.alpha=1.5"], "distill.alpha"),
    (["distill.alpha=-0.1"], "distill.alpha"),
    (["distill.temperature=0"], "distill.temperature"),
    (["distill.temperature=-1"], "distill.temperature"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.num_classes=0"], "data.num_classes"),
    (["data.eval_batch_size=0"], "data.eval_batch_size"),
    (["train.epochs=0"], "train.epochs"),
    (["train.label_smoothing=1.0"], "train.label_smoothing"),
    (["optim.lr=0"], "optim.lr"),
    (["optim.grad_clip=0"], "optim.grad_clip"),
    (["distill.loss=foo"], "distill.loss"),
    (["distill.token_loss=foo"], "distill.token_loss"),
    (["train.precision=bf17"], "train.precision"),
    (["data.name=mnist"], "data.name"),
    (["data.name=imagefolder"], "data.root"),
    (["data.name=imagefolder", "data.root=''"], "data.root"),
    (["student.kwargs.num_classes=3"], "student.kwargs.num_classes"),
    (["teacher.kwargs.num_classes=3"], "teacher.kwargs.num_classes"),
    (["student.mean=[]"], "student.mean"),
    (["teacher.std=[0.5, 0]"], "teacher.std"),
])
def test_invalid_values(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [*SYNTH, *overrides])
    assert f"'{key}'" in str(info.value)


def test_defaults_alone_need_a_data_root() -> None:
    with pytest.raises(ConfigError, match=r"'data\.root'"):
        load_config(None)
    cfg = load_config(None, ["data.root=/some/where"])
    assert cfg.data.name == "imagefolder" and cfg.data.root == "/some/where"


@pytest.mark.parametrize("bad", ["train.epochs", "=3", "distill.loss"])
def test_override_without_equals(bad: str) -> None:
    with pytest.raises(ConfigError, match="key=value") as info:
        load_config(None, [*SYNTH, bad])
    assert f"'{bad}'" in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(missing)
    assert missing in str(info.value)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    preset = write(tmp_path / "bad.yaml", "seed: 1\ntrain: {epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_config(preset)
    assert preset in str(info.value)
    assert "line" in str(info.value)


def test_yaml_top_level_list(tmp_path: Path) -> None:
    preset = write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(preset)


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    preset = write(tmp_path / "evil.yaml", "seed: !!python/object/apply:os.getpid []\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(preset)


# ------------------------------------------------------------------------------------------
# schema documentation and the reference table
# ------------------------------------------------------------------------------------------


def test_every_field_has_a_doc() -> None:
    fields = iter_fields()
    assert len(fields) > 40
    for key, f in fields:
        assert f.metadata.get("doc", "").strip(), f"{key} has no documentation"


def test_iter_fields_matches_the_default_tree() -> None:
    def leaves(tree: dict, prefix: str = "") -> list[str]:
        out = []
        for k, v in tree.items():
            is_section = isinstance(v, dict) and not prefix  # kwargs dicts are leaves
            out += leaves(v, f"{k}.") if is_section else [f"{prefix}{k}"]
        return out

    assert [k for k, _ in iter_fields()] == leaves(DEFAULTS)


def test_choices_refer_to_schema_keys_and_include_their_defaults() -> None:
    keys = {k for k, _ in iter_fields()}
    for key, choices in CHOICES.items():
        assert key in keys
        section, _, leaf = key.partition(".")
        assert DEFAULTS[section][leaf] in choices


def test_reference_has_one_row_per_leaf_key() -> None:
    ref = reference_markdown()
    rows = [line for line in ref.splitlines() if line.startswith("| `")]
    keys = [row.split("`")[1] for row in rows]
    assert keys == [k for k, _ in iter_fields()]
    row = next(r for r in rows if r.startswith("| `train.epochs` "))
    assert f"`{DEFAULTS['train']['epochs']}`" in row
    assert "Passes over the training split" in row


# ------------------------------------------------------------------------------------------
# through the real CLI (subprocesses)
# ------------------------------------------------------------------------------------------


def _assert_one_line_error(proc, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kd: error: ")
    for needle in needles:
        assert needle in lines[0]


@pytest.mark.parametrize("args, needles", [
    (["train.epoch=3"], ["'train.epoch'", "train.epochs"]),
    (["train.epochs=abc"], ["'train.epochs'"]),
    (["distill.alpha=1.5"], ["'distill.alpha'"]),
    (["train=3"], ["'train'"]),
])
def test_cli_config_errors_are_one_line(args: list[str], needles: list[str]) -> None:
    _assert_one_line_error(run_kd("config", *args, timeout=120), *needles)


def test_cli_config_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.yaml")
    _assert_one_line_error(run_kd("config", "-c", missing, timeout=120), missing)


def test_cli_config_prints_the_demo_preset() -> None:
    proc = run_kd("config", "train.epochs=4", timeout=120)
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["data"]["name"] == "digits"
    assert printed["train"]["epochs"] == 4
    expected = to_container(load_config(DEMO_PRESET, ["train.epochs=4"]))
    assert printed == expected


def test_cli_config_reference_matches_the_schema() -> None:
    proc = run_kd("config", "--reference", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference_markdown()
    for key, _ in iter_fields():
        assert f"| `{key}` |" in proc.stdout


# ------------------------------------------------------------------------------------------
# without -c: the demo, unless the overrides name another dataset or model
# ------------------------------------------------------------------------------------------


def test_without_a_preset_overrides_tweak_the_demo() -> None:
    cfg, origins = load_command_config(None, ["train.epochs=2", "data.name=digits"])
    assert to_container(cfg) == to_container(load_config(DEMO_PRESET, ["train.epochs=2"]))
    assert origins is not None and DEMO_PRESET in origins.source
    assert origins.values["student.kwargs.img_size"] == 16
    assert "train.epochs" not in origins.values  # typed, so not explained


@pytest.mark.parametrize("switch", ["data.name=synthetic", "student.name=vit_small_patch16_224",
                                    "teacher.name=vit_small_patch16_224"])
def test_naming_another_dataset_or_model_starts_from_the_schema_defaults(switch: str) -> None:
    overrides = ["data.name=synthetic", "data.num_classes=10", switch]
    cfg, origins = load_command_config(None, overrides)
    assert to_container(cfg) == to_container(load_config(None, overrides))
    assert cfg.student.kwargs == {} and cfg.teacher.kwargs == {}  # nothing of the demo leaks
    assert cfg.output_dir == DEFAULTS["output_dir"] and cfg.train.epochs == DEFAULTS["train"][
        "epochs"]
    assert "schema defaults" in origins.source and "data.name=synthetic" in origins.source


def test_the_issue_example_is_not_the_demo() -> None:
    """The command a new user typed: the demo's 16-pixel, one-channel student came along."""
    cfg, _ = load_command_config(None, [
        "data.name=synthetic", "data.num_classes=10", "data.image_size=224",
        "student.name=vit_tiny_patch16_224", "teacher.checkpoint=null", "distill.loss=none"])
    assert cfg.student.kwargs == {} and cfg.data.image_size == 224


def test_an_explicit_preset_is_never_switched() -> None:
    demo = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    cfg, origins = load_command_config(demo, ["data.name=synthetic"])
    assert origins is None
    assert cfg.student.kwargs["img_size"] == 16  # -c configs/demo.yaml: the demo, changed


def test_a_validation_error_says_the_value_came_from_the_schema_defaults() -> None:
    with pytest.raises(ConfigError) as e:
        load_command_config(None, ["student.name=vit_small_patch16_224"])
    assert "'data.root'" in str(e.value)
    assert ("data.root=null comes from the schema defaults, used because no -c was given and "
            "student.name=vit_small_patch16_224 is not the demo's") in str(e.value)


def test_origins_name_only_the_keys_an_error_mentions() -> None:
    origins = ConfigOrigins({"student.kwargs.img_size": 16, "student.kwargs.in_chans": 1,
                             "data.image_size": 16, "teacher.kwargs.depth": 3}, "the demo")
    line = "student.kwargs: cannot take (1, 1, 32, 32) images (data.image_size=32)"
    assert origins.explain(line) == ("; student.kwargs {img_size: 16, in_chans: 1}, "
                                     "data.image_size=16 come from the demo")
    assert origins.explain("teacher.image_size is wrong") == ""  # not teacher.kwargs.*
    assert origins.explain("nothing here") == ""


@pytest.mark.parametrize("command", [["config"], ["train"], ["plan", "--gpu", "h100"],
                                     ["profile"], ["compare"], ["tune-loader"],
                                     ["cache-teacher", "--out", "cache"]])
def test_every_config_command_follows_the_rule(command: list[str], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    from kd.cli import main

    capsys.readouterr()
    rc = main([*command, "student.name=vit_small_patch16_224", f"output_dir={tmp_path}/run"])
    err = capsys.readouterr().err
    assert rc == 2, err
    line = next(x for x in err.splitlines() if x.startswith("kd: error: "))
    assert "data.root=null comes from the schema defaults" in line
    assert "student.name=vit_small_patch16_224 is not the demo's" in line
    assert list(tmp_path.iterdir()) == []
