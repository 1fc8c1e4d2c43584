#!/usr/bin/env python3
"""Check, inside the kd image, what multi-node GPU training needs from it.

    docker run --rm --gpus all --entrypoint python kd launch/container_check.py
    docker run --rm --gpus all --device /dev/infiniband/uverbs0 ... --entrypoint python kd \\
        launch/container_check.py --efa            # on an EFA instance: the device must be seen

One line per check (PASS, FAIL or SKIP), then exit code 1 if any check failed:

- ``deepspeed``: ``import deepspeed`` (``dist.strategy=deepspeed``).
- ``compiler``: the C compiler Triton builds its launchers with (``CC``, else gcc, else clang:
  triton/runtime/build.py ``_find_compiler``); the official ``pytorch/pytorch:*-runtime`` images
  have none (pytorch/pytorch#116696), so ``train.compile=true`` failed there.
- ``compile``: ``torch.compile`` (Inductor) of a small model, run forward and backward once on
  the GPU (Triton) or on the CPU (C++), and compared with eager.
- ``nccl-net``: the NCCL network plugin (aws-ofi-nccl, ``libnccl-net*.so``), looked up the way
  NCCL does. Without it NCCL runs its own TCP socket transport between nodes even with
  ``FI_PROVIDER=efa`` set.
- ``efa``: libfabric's ``fi_info``, and ``fi_info -p efa`` listing an EFA device (SKIP when
  there is none unless ``--efa``).
- ``pins``: the packages pinned in ``$PIP_CONSTRAINT`` (launch/pin_image_packages.py) are
  installed at exactly those versions: pip kept the image's torch.

Each check is a function returning a :class:`CheckResult`, so tests can call them one by one.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
CHECKS = ("deepspeed", "compiler", "compile", "nccl-net", "efa", "pins")

# Where aws-ofi-nccl is installed. The EFA installer puts it under /opt/amazon/ofi-nccl/lib (the
# AWS DLC base image's LD_LIBRARY_PATH, aws/deep-learning-containers
# base/x86_64/gpu/cu129/ubuntu22.04/Dockerfile) or its multiarch subfolder (PyTorch 2.8 DLC,
# pytorch/training/docker/2.8/py3/cu129/Dockerfile.gpu); NVIDIA's images use
# /opt/amazon/aws-ofi-nccl/lib (NVIDIA-NeMo/RL#2359); builds from source use their --prefix:
# /opt/aws-ofi-nccl is common, the default is /usr/local (PyTorch 2.5 DLC's Dockerfile.gpu).
KNOWN_PLUGIN_DIRS = (
    "/opt/amazon/ofi-nccl/lib/x86_64-linux-gnu",
    "/opt/amazon/ofi-nccl/lib/aarch64-linux-gnu",
    "/opt/amazon/ofi-nccl/lib",
    "/opt/amazon/aws-ofi-nccl/lib",
    "/opt/aws-ofi-nccl/lib",
    "/usr/local/lib",
)
# dlopen() of a bare name searches LD_LIBRARY_PATH, then the ld.so cache, then these (ld.so(8)).
DEFAULT_LIBRARY_DIRS = ("/lib", "/usr/lib", "/lib64", "/usr/lib64")
EFA_FI_INFO = "/opt/amazon/efa/bin/fi_info"  # the EFA installer's libfabric


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome: ``status`` is PASS, FAIL or SKIP; ``detail`` says what was seen."""

    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name:<9} {self.detail}"


def _first_line(error: BaseException, limit: int = 300) -> str:
    """``Type: first line`` of the innermost cause: torch.compile wraps a backend's error in
    BackendCompilerFailed, whose first line does not name the reason; the wrapped one is its
    ``inner_exception`` (torch/_dynamo/exc.py), or ``__cause__`` elsewhere."""
    while True:
        inner = error.__cause__ or getattr(error, "inner_exception", None)
        if not isinstance(inner, BaseException):
            break
        error = inner
    text = str(error).strip().splitlines()
    message = f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")
    return message if len(message) <= limit else message[:limit - 3] + "..."


# --- deepspeed ------------------------------------------------------------------------------

def check_deepspeed() -> CheckResult:
    """``import deepspeed`` works (it imports torch and probes the accelerator)."""
    try:
        import deepspeed
    except Exception as e:  # ImportError, or whatever its accelerator probe raises
        return CheckResult("deepspeed", FAIL, f"import deepspeed failed: {_first_line(e)}")
    return CheckResult("deepspeed", PASS, f"deepspeed {deepspeed.__version__}")


# --- compiler and torch.compile -------------------------------------------------------------

def find_c_compiler(env: Mapping[str, str],
                    which: Callable[[str], str | None] = shutil.which) -> str | None:
    """The C compiler Triton would use, as a runnable path: ``$CC``, else gcc, else clang on
    PATH (triton/runtime/build.py ``_find_compiler``); None when that one cannot run."""
    if env.get("CC"):
        return which(env["CC"])
    return which("gcc") or which("clang")


def check_compiler(env: Mapping[str, str] | None = None,
                   which: Callable[[str], str | None] = shutil.which) -> CheckResult:
    """A C compiler for Triton (GPU); the C++ one Inductor's CPU backend uses is reported too
    (``$CXX``, else g++: torch/_inductor/config.py ``cpp.cxx``)."""
    env = os.environ if env is None else env
    cc = find_c_compiler(env, which)
    cxx = which(env["CXX"]) if env.get("CXX") else which("g++")
    if cc is None:
        tried = f"CC={env['CC']}" if env.get("CC") else "gcc or clang on PATH"
        return CheckResult("compiler", FAIL,
                           f"no C compiler ({tried}): Triton cannot build its kernels, so "
                           f"train.compile=true fails on GPUs; build on an image with gcc")
    return CheckResult("compiler", PASS,
                       f"C: {cc}; C++: {cxx or 'none (torch.compile on CPU unavailable)'}")


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@contextlib.contextmanager
def fresh_compile_caches() -> Iterator[None]:
    """Point Inductor's and Triton's caches at an empty folder while the block runs: a cache hit
    skips the compiler, so a check on a warm cache (the image build's, an earlier run's) could
    pass without one. Both read these variables when they need the folder
    (torch/_inductor/runtime/cache_dir_utils.py ``cache_dir``, triton/knobs.py ``cache.dir``)."""
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {key: os.environ.get(key) for key in keys}
    with tempfile.TemporaryDirectory(prefix="kd_container_check_") as tmp:
        for key in keys:
            os.environ[key] = os.path.join(tmp, key.split("_")[0].lower())
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def check_torch_compile(device: str = "auto", backend: str | Callable = "inductor") -> CheckResult:
    """``torch.compile`` a small MLP, run one training step (forward and backward) and compare
    the output with eager. Inductor generates Triton kernels on CUDA and C++ on CPU; both need
    a compiler at run time, which is what this proves.

    Args:
        device: ``auto`` (CUDA when visible), ``cuda`` or ``cpu``.
        backend: ``torch.compile``'s backend (tests pass ``eager`` or a failing callable).
    """
    import torch

    device = _resolve_device(device)
    if device == "cuda" and not torch.cuda.is_available():
        return CheckResult("compile", FAIL, "no CUDA device visible (docker run --gpus all?)")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(),
                                torch.nn.Linear(32, 4)).to(device)
    x = torch.randn(8, 16, device=device)
    start = time.perf_counter()
    try:
        with fresh_compile_caches():
            compiled = torch.compile(model, backend=backend)
            out = compiled(x)
            out.square().mean().backward()  # compiles the backward graph too, as training does
            with torch.no_grad():
                expected = model(x)
            if device == "cuda":
                torch.cuda.synchronize()
    except Exception as e:
        needs = ("a C compiler for Triton (CC, gcc or clang)" if device == "cuda"
                 else "a C++ compiler for Inductor's CPU code (CXX or g++)")
        return CheckResult("compile", FAIL, f"on {device}: {_first_line(e)} (needs {needs})")
    finally:
        torch.compiler.reset()
    seconds = time.perf_counter() - start
    diff = (out.detach() - expected).abs().max().item()
    if diff > 1e-3:
        return CheckResult("compile", FAIL, f"on {device}: compiled output differs from eager by "
                                            f"{diff:.2e}")
    name = backend if isinstance(backend, str) else getattr(backend, "__name__", "custom")
    return CheckResult("compile", PASS, f"{name} on {device}, forward and backward in "
                                        f"{seconds:.1f} s (torch {torch.__version__})")


# --- NCCL network plugin --------------------------------------------------------------------

def nccl_net_plugin_names(value: str | None) -> list[str]:
    """The libraries NCCL tries for ``NCCL_NET_PLUGIN=value``, in order (NVIDIA/nccl
    src/plugin/net.cc and plugin_open.cc): unset means ``libnccl-net.so``; ``none`` means no
    plugin; otherwise each comma-separated entry as given, then, unless it is a path or a
    ``lib*.so`` name, ``libnccl-net-<entry>.so``."""
    if value is None:
        return ["libnccl-net.so"]
    if value.lower() == "none":
        return []
    names: list[str] = []
    for entry in value.split(","):
        if not entry:
            continue
        names.append(entry)
        if "/" not in entry and not (entry.startswith("lib") and entry.endswith(".so")):
            names.append(f"libnccl-net-{entry}.so")
    return names


def parse_ld_cache(text: str) -> dict[str, str]:
    """``ldconfig -p`` output as ``{library name: path}`` (the first entry of a name wins)."""
    cache: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"\s+(\S+)\s+\(.*\)\s+=>\s+(\S+)", line)
        if match:
            cache.setdefault(match.group(1), match.group(2))
    return cache


def read_ld_cache() -> dict[str, str]:
    """This system's ld.so cache (empty when ldconfig is missing)."""
    ldconfig = shutil.which("ldconfig") or next(
        (p for p in ("/sbin/ldconfig", "/usr/sbin/ldconfig") if Path(p).exists()), None)
    if ldconfig is None:
        return {}
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return {}
    return parse_ld_cache(out.stdout)


@dataclass(frozen=True)
class PluginLookup:
    """Where NCCL would find its network plugin: ``found`` is the library it would load (None:
    none); ``elsewhere`` lists ``libnccl-net*.so`` files it would not see."""

    names: tuple[str, ...]
    found: Path | None
    elsewhere: tuple[Path, ...]


def find_nccl_net_plugin(env: Mapping[str, str], ld_cache: Mapping[str, str],
                         known_dirs: Sequence[str] = KNOWN_PLUGIN_DIRS,
                         default_dirs: Sequence[str] = DEFAULT_LIBRARY_DIRS) -> PluginLookup:
    """Resolve NCCL's plugin names like dlopen(): a path as is; a bare name through
    ``LD_LIBRARY_PATH``, the ld.so cache, then the default directories."""
    names = nccl_net_plugin_names(env.get("NCCL_NET_PLUGIN"))
    search = [d for d in re.split(r"[:;]", env.get("LD_LIBRARY_PATH", "")) if d]
    found: Path | None = None
    for name in names:
        if "/" in name:
            candidates = [Path(name)]
        else:
            candidates = [Path(d) / name for d in search]
            if name in ld_cache:
                candidates.append(Path(ld_cache[name]))
            candidates += [Path(d) / name for d in default_dirs]
        found = next((c for c in candidates if c.is_file()), None)
        if found is not None:
            break
    elsewhere = tuple(sorted({p for d in known_dirs for p in Path(d).glob("libnccl-net*.so")
                              if found is None or p.resolve() != found.resolve()}))
    return PluginLookup(tuple(names), found, elsewhere)


def check_nccl_net_plugin(env: Mapping[str, str] | None = None,
                          ld_cache: Mapping[str, str] | None = None,
                          known_dirs: Sequence[str] = KNOWN_PLUGIN_DIRS,
                          default_dirs: Sequence[str] = DEFAULT_LIBRARY_DIRS,
                          load: bool = False) -> CheckResult:
    """NCCL will load an external network plugin (aws-ofi-nccl for EFA).

    Args:
        env: the environment NCCL will see (default: this process's).
        ld_cache: ``{name: path}`` of the ld.so cache (default: ``ldconfig -p``).
        known_dirs: where to look for a plugin NCCL would not find, for the hint.
        default_dirs: the loader's default directories.
        load: also dlopen() the plugin found, as NCCL does (its libfabric and CUDA libraries
            must load too); meaningful with this process's environment and a GPU.
    """
    env = os.environ if env is None else env
    lookup = find_nccl_net_plugin(env, read_ld_cache() if ld_cache is None else ld_cache,
                                  known_dirs, default_dirs)
    if not lookup.names:
        return CheckResult("nccl-net", FAIL, "NCCL_NET_PLUGIN=none disables the network plugin: "
                                             "NCCL uses TCP sockets between nodes")
    if lookup.found is None:
        tried = ", ".join(lookup.names)
        if lookup.elsewhere:
            # NCCL_NET_PLUGIN may name the file itself; its folder on LD_LIBRARY_PATH helps only
            # when the file has the name NCCL looks for.
            plugin = next((p for p in lookup.elsewhere if p.name in lookup.names),
                          lookup.elsewhere[0])
            fix = f"set NCCL_NET_PLUGIN={plugin}"
            if plugin.name in lookup.names:
                fix = f"add {plugin.parent} to LD_LIBRARY_PATH or {fix}"
            return CheckResult("nccl-net", FAIL, f"NCCL looks for {tried} and will not find it, "
                                                 f"but {plugin} exists: {fix}")
        return CheckResult("nccl-net", FAIL,
                           f"no NCCL network plugin ({tried}; aws-ofi-nccl): NCCL falls back to "
                           f"TCP sockets between nodes; build on an image with EFA (Dockerfile)")
    if load:
        try:
            ctypes.CDLL(str(lookup.found), mode=os.RTLD_NOW | os.RTLD_LOCAL)
        except OSError as e:
            return CheckResult("nccl-net", FAIL, f"{lookup.found} does not load: {e}")
    return CheckResult("nccl-net", PASS, f"{lookup.found}" + (" (loads)" if load else ""))


# --- EFA ------------------------------------------------------------------------------------

def find_fi_info(which: Callable[[str], str | None] = shutil.which,
                 fallback: str = EFA_FI_INFO) -> str | None:
    """libfabric's fi_info on PATH, else where the EFA installer puts it."""
    return which("fi_info") or (fallback if Path(fallback).is_file() else None)


def check_efa(require_device: bool = False, fi_info: str | None = None,
              which: Callable[[str], str | None] = shutil.which) -> CheckResult:
    """libfabric is installed (``fi_info``) and, on an EFA instance, its EFA provider sees a
    device (``fi_info -p efa``). Without a device the check is SKIP unless ``require_device``.

    Args:
        fi_info: the fi_info to run (default: found on PATH or in /opt/amazon/efa/bin).
    """
    exe = fi_info or find_fi_info(which)
    if exe is None:
        return CheckResult("efa", FAIL, "no fi_info: libfabric (EFA installer) is not in the "
                                        "image, so NCCL cannot use EFA")
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
        probe = subprocess.run([exe, "-p", "efa"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return CheckResult("efa", FAIL, f"{exe} does not run: {_first_line(e)}")
    match = re.search(r"libfabric:\s*(\S+)", version.stdout)
    libfabric = f"libfabric {match.group(1)}" if match else f"libfabric ({exe})"
    domains = sorted(set(re.findall(r"domain:\s*(\S+)", probe.stdout)))
    if probe.returncode == 0 and "efa" in probe.stdout and domains:
        return CheckResult("efa", PASS, f"{libfabric}, EFA devices: {', '.join(domains)}")
    said = (probe.stderr or probe.stdout).strip().splitlines()
    reason = f"`fi_info -p efa` found no EFA device ({said[0] if said else probe.returncode})"
    if require_device:
        return CheckResult("efa", FAIL, f"{libfabric}; {reason}: on an EFA instance, pass its "
                                        f"/dev/infiniband/uverbs* devices to the container")
    return CheckResult("efa", SKIP, f"{libfabric}; {reason}; --efa requires one")


# --- pinned packages ------------------------------------------------------------------------

def check_pins(constraint_files: Sequence[str] | None = None,
               version_of: Callable[[str], str] = importlib.metadata.version) -> CheckResult:
    """Every ``name==version`` line of the constraints files is installed at that version.

    Args:
        constraint_files: default: ``$PIP_CONSTRAINT`` (whitespace-separated, as pip reads it).
        version_of: installed version of a distribution (raises PackageNotFoundError).
    """
    if constraint_files is None:
        constraint_files = os.environ.get("PIP_CONSTRAINT", "").split()
    if not constraint_files:
        return CheckResult("pins", SKIP, "PIP_CONSTRAINT is not set (not the kd image?)")
    wrong: list[str] = []
    count = 0
    for file in constraint_files:
        try:
            text = Path(file).read_text()
        except OSError as e:
            return CheckResult("pins", FAIL, f"cannot read {file}: {e}")
        for raw in text.splitlines():
            line = raw.split("#", 1)[0].strip()
            if "==" not in line:
                continue
            name, pinned = (part.strip() for part in line.split("==", 1))
            count += 1
            try:
                installed = version_of(name)
            except importlib.metadata.PackageNotFoundError:
                wrong.append(f"{name} missing (pinned {pinned})")
                continue
            if installed != pinned:
                wrong.append(f"{name} {installed} (pinned {pinned})")
    if wrong:
        return CheckResult("pins", FAIL, "pip replaced the image's packages: " + ", ".join(wrong))
    return CheckResult("pins", PASS, f"{count} packages at the image's versions "
                                     f"({' '.join(constraint_files)})")


# --- command line ---------------------------------------------------------------------------

def run_checks(names: Sequence[str] = CHECKS, device: str = "auto",
               require_efa: bool = False) -> Iterator[CheckResult]:
    """Run the named checks in :data:`CHECKS` order, yielding each result as it is known."""
    for name in (n for n in CHECKS if n in names):
        if name == "deepspeed":
            yield check_deepspeed()
        elif name == "compiler":
            yield check_compiler()
        elif name == "compile":
            yield check_torch_compile(device)
        elif name == "nccl-net":
            # dlopen() only where NCCL would: with a GPU (the plugin may need the CUDA driver).
            yield check_nccl_net_plugin(load=_resolve_device(device) == "cuda")
        elif name == "efa":
            yield check_efa(require_efa)
        elif name == "pins":
            yield check_pins()


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/container_check.py",
        description="Check the kd image: deepspeed, a compiler and torch.compile, the NCCL EFA "
                    "plugin, libfabric, and the image's pinned torch. Exit code 1 on a FAIL.")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="where torch.compile runs (auto: CUDA when visible)")
    p.add_argument("--efa", action="store_true",
                   help="require an EFA device (fi_info -p efa); run on p4d/p5 instances")
    p.add_argument("--only", default=",".join(CHECKS),
                   help=f"comma-separated checks to run (default: all of {','.join(CHECKS)})")
    args = p.parse_args(argv)
    args.only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = sorted(set(args.only) - set(CHECKS))
    if unknown:
        p.error(f"--only: unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    failed = 0
    for result in run_checks(args.only, args.device, args.efa):
        print(result.line(), flush=True)
        failed += result.status == FAIL
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
