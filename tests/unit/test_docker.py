"""The Docker image's helpers: the constraints that keep the base image's torch
(launch/pin_image_packages.py) and the container check (launch/container_check.py). Docker is
not here, so each check runs as a function against stand-ins (a fake package list, a folder
standing in for the library paths, a fake fi_info), plus the real pip and torch.compile on CPU;
tests marked gpu run the real checks on CUDA."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import ROOT

LAUNCH = ROOT / "launch"
PIN = LAUNCH / "pin_image_packages.py"
CHECK = LAUNCH / "container_check.py"

# What `pip list --format=freeze` shows in a PyTorch CUDA image, trimmed.
IMAGE = {
    "torch": "2.5.1+cu124",
    "torchvision": "0.20.1+cu124",
    "torchaudio": "2.5.1+cu124",
    "triton": "3.1.0",
    "nvidia-nccl-cu12": "2.21.5",
    "nvidia_cudnn_cu12": "9.1.0.70",
    "cuda-bindings": "12.9.0",
    "numpy": "1.26.4",
    "accelerate": "1.2.1",
    "torchmetrics": "1.4.0",
    "torchtnt": "0.2.4",
}
PINNED = {"torch", "torchvision", "torchaudio", "triton", "nvidia-nccl-cu12", "nvidia_cudnn_cu12",
          "cuda-bindings"}
KD_REQUIREMENTS = ["torch>=2.4", "torchvision>=0.19", "timm>=1.0.15", "deepspeed>=0.15"]


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pin() -> ModuleType:
    return load(PIN, "kd_launch_pin_image_packages")


@pytest.fixture(scope="module")
def cc() -> ModuleType:
    return load(CHECK, "kd_launch_container_check")


def freeze(packages: dict[str, str]) -> str:
    return "".join(f"{name}=={version}\n" for name, version in packages.items())


def run_script(script: Path, *argv: str, env: dict[str, str] | None = None,
               stdin: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *argv], cwd=ROOT, input=stdin,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


# --- constraints: which packages, which versions --------------------------------------------

def test_pins_exactly_the_cuda_coupled_packages(pin: ModuleType) -> None:
    pins = pin.select_pins(IMAGE)
    assert set(pins) == PINNED  # not numpy, accelerate, nor torchmetrics/torchtnt (torch* names)
    assert pins["torch"] == "2.5.1+cu124" and pins["torchvision"] == "0.20.1+cu124"
    lines = pin.render(pins).splitlines()
    assert "torch==2.5.1+cu124" in lines and "nvidia_cudnn_cu12==9.1.0.70" in lines
    assert [line for line in lines if not line.startswith("#")] == sorted(
        (f"{n}=={v}" for n, v in pins.items()), key=lambda line: pin.normalize(line))


def test_local_tag_is_what_keeps_the_image_build(pin: ModuleType) -> None:
    """PEP 440: a pin without the local label admits any build of that release (PyPI's too)."""
    from packaging.specifiers import SpecifierSet

    assert SpecifierSet("==2.5.1").contains("2.5.1+cu124")
    assert SpecifierSet("==2.5.1").contains("2.5.1")
    exact = SpecifierSet(f"=={pin.select_pins(IMAGE)['torch']}")
    assert exact.contains("2.5.1+cu124") and not exact.contains("2.5.1")
    assert not exact.contains("2.5.1+cu121")


def test_kd_requirements_come_from_setup_cfg(pin: ModuleType) -> None:
    reqs = pin.read_requirements(ROOT / "setup.cfg", ["deepspeed", "accelerate"])
    assert {"torch>=2.4", "torchvision>=0.19", "deepspeed>=0.15", "accelerate>=0.30"} <= set(reqs)
    with pytest.raises(pin.PinError, match="no extra 'gpu'"):
        pin.read_requirements(ROOT / "setup.cfg", ["gpu"])


def test_requirements_the_pins_satisfy(pin: ModuleType) -> None:
    assert pin.check_requirements(pin.select_pins(IMAGE), KD_REQUIREMENTS) == []
    # NGC images carry pre-release torch builds; pip accepts an installed one for >=2.4.
    ngc = {"torch": "2.5.0a0+e000cf0ad9.nv24.10", "torchvision": "0.20.0a0"}
    assert pin.check_requirements(pin.select_pins(ngc), KD_REQUIREMENTS) == []
    # A requirement behind a false marker does not apply.
    old = pin.select_pins({**IMAGE, "torch": "2.3.1+cu121"})
    assert pin.check_requirements(old, ['torch>=2.4; python_version < "3"']) == []


def test_requirements_the_pins_cannot_satisfy(pin: ModuleType) -> None:
    old = pin.select_pins({**IMAGE, "torch": "2.3.1+cu121"})
    assert pin.check_requirements(old, KD_REQUIREMENTS) == [
        "the image's torch 2.3.1+cu121 does not satisfy kd's torch>=2.4"]
    no_vision = pin.select_pins({k: v for k, v in IMAGE.items() if k != "torchvision"})
    assert pin.check_requirements(no_vision, KD_REQUIREMENTS) == [
        "the image has no torchvision: pip would install PyPI's build for another CUDA"]
    with pytest.raises(pin.PinError, match=r"torch 2\.3\.1\+cu121 does not satisfy.*BASE_IMAGE"):
        pin.build_constraints({**IMAGE, "torch": "2.3.1+cu121"}, KD_REQUIREMENTS)


def test_freeze_list_parsing(pin: ModuleType) -> None:
    text = "# comment\n-e git+https://x/y#egg=kd\ntorch==2.5.1+cu124\nnumpy==1.26.4\n"
    assert pin.parse_freeze(text) == {"torch": "2.5.1+cu124", "numpy": "1.26.4"}
    # `pip freeze` (not `pip list --format=freeze`) names a URL for direct installs, no version.
    url = pin.parse_freeze("torch @ https://example.com/torch-2.5.1%2Bcu124-cp311.whl\n")
    with pytest.raises(pin.PinError, match="pip list --format=freeze"):
        pin.select_pins(url)


def test_cli_writes_constraints(tmp_path: Path) -> None:
    out = tmp_path / "constraints.txt"
    res = run_script(PIN, "--output", str(out), "--extras", "deepspeed,accelerate",
                     "--installed", "-", stdin=freeze(IMAGE))
    assert res.returncode == 0, res.stderr
    pinned = [line for line in out.read_text().splitlines() if not line.startswith("#")]
    assert len(pinned) == len(PINNED) and "torch==2.5.1+cu124" in pinned
    assert "kept torch==2.5.1+cu124, torchaudio==2.5.1+cu124" in res.stderr


def test_cli_old_torch_is_one_line_and_exit_2(tmp_path: Path) -> None:
    installed = tmp_path / "freeze.txt"
    installed.write_text(freeze({**IMAGE, "torch": "2.3.1+cu121"}))
    out = tmp_path / "constraints.txt"
    res = run_script(PIN, "--output", str(out), "--installed", str(installed))
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("pin_image_packages: error: ")
    assert "the image's torch 2.3.1+cu121 does not satisfy kd's torch>=2.4" in res.stderr
    assert not out.exists()


def test_pip_honours_the_constraints_file(tmp_path: Path) -> None:
    """The real pip, offline: the file generated for this environment lets pip keep the
    installed torch; a pin it cannot meet stops pip instead of replacing torch."""
    keep = tmp_path / "keep.txt"
    res = run_script(PIN, "--output", str(keep))
    assert res.returncode == 0, res.stderr
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "torch>=2.4",
           "torchvision>=0.19"]
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    ok = subprocess.run(pip, env={**env, "PIP_CONSTRAINT": str(keep)}, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "Would install" not in ok.stdout
    other = tmp_path / "other.txt"
    other.write_text("torch==2.4.0+cu999\n")
    bad = subprocess.run(pip, env={**env, "PIP_CONSTRAINT": str(other)}, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "torch" in bad.stderr


# --- container check: NCCL network plugin ---------------------------------------------------

def test_plugin_names_follow_nccl(cc: ModuleType) -> None:
    assert cc.nccl_net_plugin_names(None) == ["libnccl-net.so"]
    assert cc.nccl_net_plugin_names("ofi") == ["ofi", "libnccl-net-ofi.so"]
    assert cc.nccl_net_plugin_names("NONE") == []
    assert cc.nccl_net_plugin_names("/opt/p/libx.so") == ["/opt/p/libx.so"]
    assert cc.nccl_net_plugin_names("libnccl-net-aws-ofi.so") == ["libnccl-net-aws-ofi.so"]
    assert cc.nccl_net_plugin_names("ofi,aws-ofi") == [
        "ofi", "libnccl-net-ofi.so", "aws-ofi", "libnccl-net-aws-ofi.so"]


def test_parse_ld_cache(cc: ModuleType) -> None:
    text = textwrap.dedent("""\
        3 libs found in cache `/etc/ld.so.cache'
        \tlibnccl-net.so (libc6,x86-64) => /opt/amazon/ofi-nccl/lib/x86_64-linux-gnu/libnccl-net.so
        \tlibfabric.so.1 (libc6,x86-64) => /opt/amazon/efa/lib/libfabric.so.1
        \tlibnccl-net.so (libc6) => /usr/lib32/libnccl-net.so
        """)
    assert cc.parse_ld_cache(text) == {
        "libnccl-net.so": "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu/libnccl-net.so",
        "libfabric.so.1": "/opt/amazon/efa/lib/libfabric.so.1"}


def plugin_check(cc: ModuleType, env: dict[str, str], cache: dict[str, str] | None = None,
                 known: tuple[str, ...] = (), load: bool = False):
    return cc.check_nccl_net_plugin(env=env, ld_cache=cache or {}, known_dirs=known,
                                    default_dirs=(), load=load)


def test_plugin_found_the_way_nccl_finds_it(cc: ModuleType, tmp_path: Path) -> None:
    lib = tmp_path / "ofi-nccl" / "lib"
    lib.mkdir(parents=True)
    (lib / "libnccl-net.so").touch()
    (lib / "libnccl-net-ofi.so").touch()
    on_path = plugin_check(cc, {"LD_LIBRARY_PATH": f"/nowhere:{lib}"})
    assert (on_path.status, on_path.detail) == ("PASS", str(lib / "libnccl-net.so"))
    cached = plugin_check(cc, {}, cache={"libnccl-net.so": str(lib / "libnccl-net.so")})
    assert cached.status == "PASS"
    named = plugin_check(cc, {"LD_LIBRARY_PATH": str(lib), "NCCL_NET_PLUGIN": "ofi"})
    assert (named.status, named.detail) == ("PASS", str(lib / "libnccl-net-ofi.so"))
    by_path = plugin_check(cc, {"NCCL_NET_PLUGIN": str(lib / "libnccl-net-ofi.so")})
    assert by_path.status == "PASS"


def test_plugin_missing_or_out_of_sight(cc: ModuleType, tmp_path: Path) -> None:
    none = plugin_check(cc, {"LD_LIBRARY_PATH": str(tmp_path)})
    assert none.status == "FAIL" and "falls back to TCP sockets" in none.detail
    lib = tmp_path / "opt" / "amazon" / "ofi-nccl" / "lib"
    lib.mkdir(parents=True)
    (lib / "libnccl-net-ofi.so").touch()
    # Only under aws-ofi-nccl's own name, which NCCL opens when NCCL_NET_PLUGIN names it.
    ofi_only = plugin_check(cc, {"LD_LIBRARY_PATH": str(lib)}, known=(str(lib),))
    assert ofi_only.status == "FAIL"
    assert ofi_only.detail == (f"NCCL looks for libnccl-net.so and will not find it, but "
                               f"{lib / 'libnccl-net-ofi.so'} exists: set "
                               f"NCCL_NET_PLUGIN={lib / 'libnccl-net-ofi.so'}")
    # Installed, but in a folder the loader does not search.
    (lib / "libnccl-net.so").touch()
    hidden = plugin_check(cc, {"LD_LIBRARY_PATH": "/usr/local/cuda/lib64"}, known=(str(lib),))
    assert hidden.status == "FAIL"
    assert f"{lib / 'libnccl-net.so'} exists: add {lib} to LD_LIBRARY_PATH or set" in (
        hidden.detail)
    off = plugin_check(cc, {"LD_LIBRARY_PATH": str(lib), "NCCL_NET_PLUGIN": "none"})
    assert off.status == "FAIL" and "NCCL_NET_PLUGIN=none" in off.detail


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build a shared library")
def test_plugin_load_is_a_real_dlopen(cc: ModuleType, tmp_path: Path) -> None:
    src = tmp_path / "plugin.c"
    src.write_text("int kd_fake_nccl_net_plugin = 1;\n")
    good = tmp_path / "good"
    good.mkdir()
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(good / "libnccl-net.so"), str(src)],
                   check=True, timeout=60)
    loads = plugin_check(cc, {"LD_LIBRARY_PATH": str(good)}, load=True)
    assert loads.status == "PASS" and loads.detail.endswith("(loads)")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "libnccl-net.so").write_text("not an ELF file")
    fails = plugin_check(cc, {"LD_LIBRARY_PATH": str(broken)}, load=True)
    assert fails.status == "FAIL" and "does not load" in fails.detail


# --- container check: EFA, compiler, pins, deepspeed ----------------------------------------

def fake_fi_info(folder: Path, efa_devices: bool) -> str:
    """A stand-in for libfabric's fi_info: its --version output and `-p efa` with or without
    an EFA device (fi_getinfo returns -61, FI_ENODATA, when there is none)."""
    probe = ('printf "provider: efa\\n    fabric: efa\\n    domain: rdmap16s27-rdm\\n'
             'provider: efa\\n    fabric: efa\\n    domain: rdmap32s27-rdm\\n"; exit 0'
             if efa_devices else 'echo "fi_getinfo: -61 (No data available)" >&2; exit 1')
    script = folder / "fi_info"
    script.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        if [ "$1" = "--version" ]; then
          printf "fi_info: 1.21.0amzn5.0\\nlibfabric: 2.1.0amzn5.0\\nlibfabric api: 2.1\\n"
          exit 0
        fi
        {probe}
        """))
    script.chmod(0o755)
    return str(script)


def test_efa_check(cc: ModuleType, tmp_path: Path) -> None:
    with_device = tmp_path / "efa"
    with_device.mkdir()
    passed = cc.check_efa(fi_info=fake_fi_info(with_device, efa_devices=True))
    assert passed.status == "PASS"
    assert passed.detail == "libfabric 2.1.0amzn5.0, EFA devices: rdmap16s27-rdm, rdmap32s27-rdm"
    no_device = fake_fi_info(tmp_path, efa_devices=False)
    skipped = cc.check_efa(fi_info=no_device)
    assert skipped.status == "SKIP" and "-61 (No data available)" in skipped.detail
    required = cc.check_efa(require_device=True, fi_info=no_device)
    assert required.status == "FAIL" and "/dev/infiniband/uverbs" in required.detail
    missing = cc.check_efa(which=lambda name: None)
    assert missing.status == "FAIL" and "libfabric (EFA installer) is not in the image" in (
        missing.detail)


def test_compiler_check(cc: ModuleType) -> None:
    nothing = cc.check_compiler(env={}, which=lambda name: None)
    assert nothing.status == "FAIL" and "train.compile=true fails on GPUs" in nothing.detail
    tools = {"gcc": "/usr/bin/gcc", "g++": "/usr/bin/g++", "/opt/cc": "/opt/cc"}
    found = cc.check_compiler(env={}, which=tools.get)
    assert (found.status, found.detail) == ("PASS", "C: /usr/bin/gcc; C++: /usr/bin/g++")
    assert cc.check_compiler(env={"CC": "/opt/cc"}, which=tools.get).detail.startswith("C: /opt/cc")
    # Triton runs $CC as given, so a CC that cannot run is no compiler, whatever else is there.
    assert cc.check_compiler(env={"CC": "/missing/cc"}, which=tools.get).status == "FAIL"


def test_pins_check(cc: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("# header\ntorch==2.5.1+cu124\nnvidia-nccl-cu12==2.21.5\n")
    kept = {"torch": "2.5.1+cu124", "nvidia-nccl-cu12": "2.21.5"}
    ok = cc.check_pins([str(constraints)], version_of=kept.__getitem__)
    assert ok.status == "PASS" and ok.detail.startswith("2 packages at the image's versions")

    def replaced(name: str) -> str:
        if name == "nvidia-nccl-cu12":
            raise cc.importlib.metadata.PackageNotFoundError(name)
        return "2.9.1"

    bad = cc.check_pins([str(constraints)], version_of=replaced)
    assert bad.status == "FAIL"
    assert bad.detail == ("pip replaced the image's packages: torch 2.9.1 (pinned 2.5.1+cu124), "
                          "nvidia-nccl-cu12 missing (pinned 2.21.5)")
    monkeypatch.delenv("PIP_CONSTRAINT", raising=False)
    assert cc.check_pins().status == "SKIP"


def test_deepspeed_check(cc: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("deepspeed")
    assert cc.check_deepspeed().status == "PASS"
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import deepspeed -> ImportError
    missing = cc.check_deepspeed()
    assert missing.status == "FAIL" and missing.detail.startswith("import deepspeed failed: ")


# --- container check: torch.compile ---------------------------------------------------------

def test_compile_check_reports_pass_and_fail(cc: ModuleType) -> None:
    """The check's plumbing without a compiler: dynamo's eager backend passes, and a backend
    failing as Triton does without a C compiler is one FAIL line naming the reason."""
    passed = cc.check_torch_compile("cpu", backend="eager")
    assert passed.status == "PASS"
    assert passed.detail.startswith("eager on cpu, forward and backward")

    def no_compiler(gm, example_inputs):
        raise RuntimeError("Failed to find C compiler. Please specify via CC environment variable.")

    failed = cc.check_torch_compile("cpu", backend=no_compiler)
    assert failed.status == "FAIL"
    assert failed.detail.startswith("on cpu: RuntimeError: Failed to find C compiler.")
    assert "\n" not in failed.line()


def test_compile_caches_are_fresh_and_restored(cc: ModuleType,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/warm/inductor")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    with cc.fresh_compile_caches():
        inside = os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"]
        assert all("kd_container_check_" in path for path in inside)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/warm/inductor"
    assert "TRITON_CACHE_DIR" not in os.environ


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None, reason="Inductor's CPU backend needs g++")
def test_compile_check_really_compiles_on_cpu(cc: ModuleType) -> None:
    result = cc.check_torch_compile("cpu")
    assert result.status == "PASS", result.detail


@pytest.mark.slow
def test_cli_without_a_compiler_fails(tmp_path: Path) -> None:
    """The image defect on CPU: no C++ compiler for Inductor -> FAIL and exit code 1."""
    res = run_script(CHECK, "--only", "compile", "--device", "cpu",
                     env={"CXX": str(tmp_path / "no-g++")}, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    line = next(line for line in res.stdout.splitlines() if line.startswith(("PASS", "FAIL")))
    assert line.startswith("FAIL compile") and "C++ compiler" in line


# --- container check: command line ----------------------------------------------------------

def test_cli_one_line_per_check_and_exit_code(tmp_path: Path) -> None:
    from importlib.metadata import version

    fake_fi_info(tmp_path, efa_devices=False)
    constraints = tmp_path / "constraints.txt"
    constraints.write_text(f"pytest=={version('pytest')}\n")
    env = {"PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}",
           "PIP_CONSTRAINT": str(constraints)}
    ok = run_script(CHECK, "--only", "efa,pins", env=env)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert [line.split()[:2] for line in ok.stdout.splitlines()] == [["SKIP", "efa"],
                                                                      ["PASS", "pins"]]
    strict = run_script(CHECK, "--only", "efa,pins", "--efa", env=env)
    assert strict.returncode == 1 and strict.stdout.startswith("FAIL efa")
    constraints.write_text("pytest==0.0.1\n")
    replaced = run_script(CHECK, "--only", "pins", env=env)
    assert replaced.returncode == 1 and "pytest" in replaced.stdout
    unknown = run_script(CHECK, "--only", "docker")
    assert unknown.returncode == 2 and "unknown check(s) docker" in unknown.stderr


# --- the Dockerfile and the README ----------------------------------------------------------

def test_dockerfile_builds_on_an_image_with_efa_and_keeps_its_torch() -> None:
    text = (ROOT / "Dockerfile").read_text()
    instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
    base = next(line for line in instructions if line.startswith("ARG BASE_IMAGE="))
    assert "pytorch-training:" in base and base.endswith("-ec2") and "runtime" not in base
    order = [next(i for i, line in enumerate(instructions) if needle in line) for needle in (
        "launch/pin_image_packages.py", "ENV PIP_CONSTRAINT=", "pip install", "container_check.py")]
    assert order == sorted(order), "constraints first, then pip install, then the check"
    assert "--skip-kmod --skip-limit-conf --no-verify" in text


def test_readme_says_which_image_and_how_to_check_it() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "launch/container_check.py" in readme and "PIP_CONSTRAINT" in readme
    assert "multi-node jobs over\nEFA" in readme


# --- on CUDA: the real checks ---------------------------------------------------------------

@pytest.mark.gpu
def test_compile_check_on_cuda(cc: ModuleType) -> None:
    """Triton on the GPU: needs the C compiler the runtime images lacked."""
    result = cc.check_torch_compile("cuda")
    assert result.status == "PASS", result.detail
    assert result.detail.startswith("inductor on cuda")


@pytest.mark.gpu
@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build a shared library")
def test_nccl_opens_the_plugin_the_check_finds(cc: ModuleType, tmp_path: Path) -> None:
    """The check and NCCL agree, on this machine's loader. A libnccl-net.so first on
    LD_LIBRARY_PATH is the file NCCL opens (it rejects this stand-in, which has no
    ncclNetPlugin symbols, naming its path); with the machine's own paths, the check passes
    exactly when NCCL opens an external plugin, and fails (TCP sockets between nodes) when not."""
    src = tmp_path / "plugin.c"
    src.write_text("int kd_fake_nccl_net_plugin = 1;\n")
    lib = tmp_path / "lib"
    lib.mkdir()
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib / "libnccl-net.so"), str(src)],
                   check=True, timeout=60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = textwrap.dedent(f"""\
        import torch, torch.distributed as dist
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method="tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
        t = torch.ones(4, device="cuda")
        dist.all_reduce(t)
        torch.cuda.synchronize()
        dist.destroy_process_group()
        print("sum", t.sum().item())
        """)
    machine = os.environ.get("LD_LIBRARY_PATH", "")

    def nccl_log(ld_path: str) -> str:
        env = {**os.environ, "LD_LIBRARY_PATH": ld_path, "NCCL_DEBUG": "INFO",
               "NCCL_DEBUG_SUBSYS": "INIT,NET"}
        env.pop("NCCL_NET_PLUGIN", None)
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0 and "sum 4.0" in res.stdout, res.stdout + res.stderr
        return res.stdout + res.stderr

    fake_path = f"{lib}:{machine}"
    found = cc.check_nccl_net_plugin(env={"LD_LIBRARY_PATH": fake_path}, load=True)
    assert (found.status, found.detail) == ("PASS", f"{lib / 'libnccl-net.so'} (loads)")
    assert str(lib / "libnccl-net.so") in nccl_log(fake_path)

    own = cc.check_nccl_net_plugin(env={"LD_LIBRARY_PATH": machine}, load=True)
    log = nccl_log(machine)
    opened = "Successfully loaded external network plugin" in log or "is unsupported" in log
    assert (own.status == "PASS") == opened, f"{own.line()}\n{log[-3000:]}"
