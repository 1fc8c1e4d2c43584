#!/usr/bin/env python3
"""Write a pip constraints file that keeps the base image's CUDA-coupled packages.

    python launch/pin_image_packages.py --output /opt/kd/constraints.txt \\
        --setup-cfg setup.cfg --extras deepspeed,accelerate
    PIP_CONSTRAINT=/opt/kd/constraints.txt python -m pip install ".[deepspeed,accelerate]"

A GPU base image ships torch, torchvision, Triton and the nvidia-* libraries built for its CUDA
(torch ``2.8.0+cu129`` from download.pytorch.org, for instance). A plain ``pip install`` of kd
may replace them with PyPI's builds for another CUDA, or a newer torch that the image's NCCL,
EFA plugin and driver were never tested with. This script pins each of those packages to the
exact installed version, local tag included: PEP 440 ignores a candidate's local label when the
pin has none (https://peps.python.org/pep-0440/#version-matching), so ``torch==2.8.0`` would
still admit PyPI's ``2.8.0``, while ``torch==2.8.0+cu129`` admits only the image's build. Nothing
else is pinned: kd's other dependencies resolve as usual.

Before writing, it checks that the pinned versions satisfy kd's own requirements (setup.cfg);
if the image's torch is older than kd's ``torch>=2.4``, pip could only fail with a resolver
trace, so this stops first with one line and exit code 2.

Installed versions come from this interpreter's environment (``importlib.metadata``, the same
view as pip's), or from ``--installed FILE`` holding ``pip list --format=freeze`` output.
"""

from __future__ import annotations

import argparse
import configparser
import importlib.metadata
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # a bare base image: pip always carries its own copy
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

# Built against the image's CUDA, or tied by torch to the build it was compiled with: torch's
# wheel metadata requires exact nvidia-* versions, a Triton release series and, in newer
# releases, cuda-toolkit and cuda-bindings (torch 2.14.1+cu130 METADATA: nvidia-nccl-cu13==2.30.7,
# triton~=3.8.0, cuda-toolkit[...]==13.0.3). Replacing any of them changes the CUDA under torch.
PINNED_NAMES = ("torch", "torchvision", "torchaudio", "triton", "pytorch-triton")
PINNED_PREFIXES = ("nvidia-", "cuda-")
# kd's CUDA-coupled requirements: the image must provide them, or pip would fetch PyPI's.
REQUIRED = ("torch", "torchvision")
HEADER = ("# The base image's CUDA-coupled packages, pinned by launch/pin_image_packages.py so\n"
          "# that pip keeps them (pip reads this file through PIP_CONSTRAINT).\n")


class PinError(Exception):
    """The image cannot host kd as it is: a one-line reason (exit code 2)."""


def normalize(name: str) -> str:
    """A distribution name as pip compares it (PEP 503: case and runs of ``-_.`` folded)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def is_pinned(name: str) -> bool:
    key = normalize(name)
    return key in PINNED_NAMES or key.startswith(PINNED_PREFIXES)


def installed_packages() -> dict[str, str]:
    """``{name: version}`` of this interpreter's environment; the first of duplicates on
    ``sys.path`` wins, as for imports."""
    found: dict[str, str] = {}
    seen: set[str] = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and normalize(name) not in seen:
            seen.add(normalize(name))
            found[name] = dist.version
    return found


def parse_freeze(text: str) -> dict[str, str | None]:
    """``pip list --format=freeze`` lines (``name==version``) as ``{name: version}``. A
    ``name @ url`` line (``pip freeze`` of a direct-URL install) names no version: ``None``."""
    found: dict[str, str | None] = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        if "==" in line:
            name, version = (part.strip() for part in line.split("==", 1))
            found[name] = version
        elif " @ " in line:
            found[line.split(" @ ", 1)[0].strip()] = None
    return found


def select_pins(installed: Mapping[str, str | None]) -> dict[str, str]:
    """The pinned subset of ``installed``, ``{name: exact version}`` sorted by name.

    Raises:
        PinError: a package to pin whose version is unknown or not a PEP 440 version.
    """
    pins: dict[str, str] = {}
    for name, version in sorted(installed.items(), key=lambda item: normalize(item[0])):
        if not is_pinned(name):
            continue
        if version is None:
            raise PinError(f"{name} has no version in the package list (a `name @ url` line): "
                           f"pass `pip list --format=freeze` output, not `pip freeze`")
        try:
            Version(version)
        except InvalidVersion:
            raise PinError(f"{name} {version} is not a PEP 440 version: pip cannot pin it"
                           ) from None
        pins[name] = version
    return pins


def read_requirements(setup_cfg: Path, extras: Sequence[str] = ()) -> list[str]:
    """kd's ``install_requires`` plus the requirements of ``extras`` from setup.cfg."""
    parser = configparser.ConfigParser(interpolation=None)
    if not parser.read(setup_cfg):
        raise PinError(f"cannot read {setup_cfg}")
    lines = parser.get("options", "install_requires", fallback="").splitlines()
    for extra in extras:
        if not parser.has_option("options.extras_require", extra):
            known = ", ".join(parser.options("options.extras_require")) or "none"
            raise PinError(f"setup.cfg has no extra {extra!r} (extras: {known})")
        lines += parser.get("options.extras_require", extra).splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def check_requirements(pins: Mapping[str, str], requirements: Iterable[str],
                       required: Iterable[str] = REQUIRED) -> list[str]:
    """Why pip could not keep ``pins`` while installing ``requirements``: a missing required
    package, or a pinned version outside a requirement's range. Empty when all is well."""
    by_key = {normalize(name): (name, version) for name, version in pins.items()}
    problems = [f"the image has no {name}: pip would install PyPI's build for another CUDA"
                for name in required if normalize(name) not in by_key]
    for text in requirements:
        try:
            req = Requirement(text)
        except InvalidRequirement as e:
            raise PinError(f"kd requirement {text!r}: {e}") from None
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if normalize(req.name) not in by_key:
            continue
        name, version = by_key[normalize(req.name)]
        # prereleases=True: pip accepts an installed pre-release (NGC's torch 2.5.0a0+...) for
        # a plain range, as PEP 440 recommends for already-installed versions.
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"the image's {name} {version} does not satisfy kd's {text}")
    return problems


def render(pins: Mapping[str, str]) -> str:
    """The constraints file: the header, then one ``name==version`` line per pin."""
    return HEADER + "".join(f"{name}=={version}\n" for name, version in pins.items())


def build_constraints(installed: Mapping[str, str | None], requirements: Sequence[str],
                      required: Sequence[str] = REQUIRED) -> dict[str, str]:
    """The pins for ``installed``, checked against kd's ``requirements``.

    Raises:
        PinError: all reasons the image cannot host kd, in one line.
    """
    pins = select_pins(installed)
    problems = check_requirements(pins, requirements, required)
    if problems:
        raise PinError("; ".join(problems) + " (build FROM another image: --build-arg BASE_IMAGE)")
    return pins


def _summary(pins: Mapping[str, str]) -> str:
    named = [f"{n}=={v}" for n, v in pins.items() if not normalize(n).startswith(PINNED_PREFIXES)]
    others = len(pins) - len(named)
    return ", ".join(named + ([f"{others} nvidia-*/cuda-* packages"] if others else []))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="launch/pin_image_packages.py",
        description="Pin the image's torch, torchvision, triton, nvidia-* and cuda-* packages "
                    "in a pip constraints file, after checking them against kd's requirements.")
    p.add_argument("--output", "-o", required=True, help="constraints file to write ('-': stdout)")
    p.add_argument("--setup-cfg", default=str(Path(__file__).resolve().parents[1] / "setup.cfg"),
                   help="kd's setup.cfg, for its requirements (default: this repository's)")
    p.add_argument("--extras", default="",
                   help="comma-separated extras to be installed too, e.g. deepspeed,accelerate")
    p.add_argument("--installed", metavar="FILE",
                   help="`pip list --format=freeze` output to read instead of this environment "
                        "('-': stdin)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    extras = [e.strip() for e in args.extras.split(",") if e.strip()]
    try:
        if args.installed == "-":
            installed: Mapping[str, str | None] = parse_freeze(sys.stdin.read())
        elif args.installed:
            installed = parse_freeze(Path(args.installed).read_text())
        else:
            installed = installed_packages()
        pins = build_constraints(installed, read_requirements(Path(args.setup_cfg), extras))
    except (PinError, OSError) as e:
        print(f"pin_image_packages: error: {e}", file=sys.stderr)
        return 2
    text = render(pins)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    print(f"pin_image_packages: kept {_summary(pins)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
