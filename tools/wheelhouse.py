"""A wheelhouse for air-gapped nodes, and the offline install from it (docs/install.md).

On a machine with network access (any Python >= 3.10 with pip), for the node's Python and platform:

    python3 tools/wheelhouse.py download                     # make wheelhouse: the GPU image's gaps
    python3 tools/wheelhouse.py download --python 3.11 --provided torch --out wheelhouse-py311

On the node, from the checkout, with the site's Python (its torch is kept, the extension is built against it):

    python3 tools/wheelhouse.py install                      # make offline-install

``download`` resolves the project's requirements (pyproject.toml: dependencies, the dev extra, the build
requirements) for the target with pip's resolver, without installing anything, and downloads the wheels of
every distribution the target site does not provide: the walk through the dependency graph stops at the
distributions in ``--provided`` (a profile below, or a file of ``name`` / ``name==version`` lines; the
versions are passed to the resolver as constraints, so the wheels chosen work with the site's). torch and
triton always come from the site. A requirement with no wheel for the target (fvcore publishes only an sdist)
is built here into a wheel, which must come out pure Python (``py3-none-any``). ``manifest.json`` records the
target, the profile and each wheel (size, sha256, whether built from an sdist).

``install`` runs ``pip install --no-index --find-links WHEELHOUSE --no-build-isolation -e ".[dev]"``: no
index, the build requirements and torch from the site (the wheelhouse holds no torch), so the extension is
compiled against the torch that will load it. The compiler's output goes to a log; the lines in which
setup.py says what it built (``reclmis._C: ...``) are printed, and then ``reclmis info``.
"""

from __future__ import annotations

import argparse
import email.parser
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the TOML parser that pip vendors
    from pip._vendor import tomli as tomllib
try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
except ModuleNotFoundError:  # pip vendors packaging too
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "wheelhouse"
SITE_ONLY = ("torch", "triton")  # never from a wheelhouse: the site's builds, matched to its CUDA
# What a site provides. "gpu-image": the air-gapped GPU image of issue 35 (Python 3.12.3, CUDA 13.0, nvcc,
# one H200), which lacks fvcore, iopath, yacs, termcolor, openpyxl, et-xmlfile and ruff; "torch": torch alone.
PROFILES: dict[str, dict[str, str | None]] = {
    "gpu-image": {
        "torch": "2.11.0",
        "triton": "3.6.0",
        "transformers": "5.17.0",
        "tokenizers": "0.23.2",
        "numpy": "2.5.2",
        "pytest": None,
        "pytest-benchmark": None,
        "tensorboard": None,
        "tqdm": None,
        "pyyaml": None,
        "pillow": None,
        "matplotlib": None,
        "safetensors": None,
        "ninja": None,
    },
    "torch": {"torch": None, "triton": None},
}
_NO_DISTRIBUTION = re.compile(r"No matching distribution found for (\S+)")
_MAX_SDIST_BUILDS = 8
# manylinux_2_28_x86_64, manylinux2014_x86_64, musllinux_1_2_aarch64, linux_x86_64 -> the machine
_LINUX_PLATFORM = re.compile(r"^(?:(?:many|musl)linux_\d+_\d+|manylinux\d+|linux)_(\w+)$")


def target_environment(python: str, platform: str) -> dict[str, str]:
    """Marker variables (PEP 508) of CPython ``python`` ("3.12") on a Linux wheel platform tag."""
    match = _LINUX_PLATFORM.match(platform)
    if match is None:
        sys.exit(
            f"wheelhouse: --platform {platform}: a Linux wheel tag is needed, e.g. manylinux_2_28_x86_64"
        )
    return {
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "platform_python_implementation": "CPython",
        "platform_system": "Linux",
        "platform_machine": match[1],
        "sys_platform": "linux",
        "os_name": "posix",
        "platform_release": "",
        "platform_version": "",
    }


def platform_tags(platform: str) -> list[str]:
    """``platform`` and every older tag a node of it accepts: manylinux_2_28_x86_64 takes manylinux_2_27 ...
    manylinux_2_5 and the legacy aliases manylinux2014 (2_17), manylinux2010 (2_12) and manylinux1 (2_5).
    pip expands only the legacy names itself (before pip 24)."""
    match = re.match(r"^manylinux_2_(\d+)_(\w+)$", platform)
    if match is None:
        return [platform]
    glibc, machine = int(match[1]), match[2]
    tags = []
    for minor in range(glibc, 4, -1):
        tags.append(f"manylinux_2_{minor}_{machine}")
        legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}.get(minor)
        if legacy and machine in ("x86_64", "i686"):
            tags.append(f"{legacy}_{machine}")
    return tags


def applies(requirement: Requirement, env: dict[str, str], extras: Iterable[str] = ("",)) -> bool:
    """Whether ``requirement`` holds in ``env`` for any of ``extras`` ("" for the base requirements)."""
    marker = requirement.marker
    return marker is None or any(Marker.evaluate(marker, {**env, "extra": extra}) for extra in extras)


def project_requirements(pyproject: Path, env: dict[str, str], extras: Sequence[str] = ("dev",)) -> list[str]:
    """The build requirements, the dependencies and those of ``extras`` that apply in ``env``."""
    data = tomllib.loads(pyproject.read_text())
    lines = list(data["build-system"]["requires"]) + list(data["project"]["dependencies"])
    for extra in extras:
        lines += data["project"]["optional-dependencies"][extra]
    return [line for line in lines if applies(Requirement(line), env)]


def read_provided(spec: str) -> dict[str, str | None]:
    """A profile name or a file of ``name`` / ``name==version`` lines (# comments) -> {name: version}."""
    if spec in PROFILES:
        lines = [f"{n}=={v}" if v else n for n, v in PROFILES[spec].items()]
    else:
        lines = [line.split("#")[0].strip() for line in Path(spec).read_text().splitlines()]
    provided: dict[str, str | None] = {}
    for line in filter(None, lines):
        requirement = Requirement(line)
        pins = [s.version for s in requirement.specifier if s.operator == "=="]
        provided[canonicalize_name(requirement.name)] = pins[0] if pins else None
    for name in SITE_ONLY:
        provided.setdefault(name, None)
    return provided


@dataclass(frozen=True)
class Wheel:
    """A downloaded or built wheel: its file, distribution name, version and Requires-Dist lines."""

    path: Path
    name: str
    version: str
    requires: tuple[str, ...]

    @classmethod
    def read(cls, path: Path) -> Wheel:
        with zipfile.ZipFile(path) as archive:
            (metadata,) = (
                n for n in archive.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")
            )
            message = email.parser.BytesParser().parsebytes(archive.read(metadata), headersonly=True)
        requires = tuple(message.get_all("Requires-Dist") or ())
        return cls(path, canonicalize_name(message["Name"]), message["Version"], requires)


def closure(
    wheels: Iterable[Wheel], roots: Iterable[str], provided: Iterable[str], env: dict[str, str]
) -> list[Wheel]:
    """The wheels reachable from ``roots`` through their requirements without passing a provided name.

    ``roots`` are requirement lines; extras they name (``pkg[x]``) bring in those requirements of ``pkg``."""
    by_name = {wheel.name: wheel for wheel in wheels}
    stop = {canonicalize_name(name) for name in provided}
    todo = [Requirement(line) for line in roots]
    seen: dict[str, set[str]] = {}
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        extras = {"", *requirement.extras}
        if name in stop or extras <= seen.get(name, set()):
            continue
        seen[name] = seen.get(name, set()) | extras
        if name not in by_name:
            sys.exit(f"wheelhouse: pip resolved no wheel for {requirement} (a dependency of the project)")
        for line in by_name[name].requires:
            dependency = Requirement(line)
            if applies(dependency, env, sorted(extras)):
                todo.append(dependency)
    return [by_name[name] for name in sorted(seen)]


def _pip(*args: str, quiet: bool = True) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pip", *args] + (["--quiet"] if quiet else [])
    return subprocess.run(command, capture_output=True, text=True, check=False)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_pure_wheel(requirement: str, out: Path) -> Path:
    """Build ``requirement`` from its sdist into ``out``; the wheel must be pure Python to serve the target."""
    with tempfile.TemporaryDirectory() as tmp:
        name = Requirement(requirement).name
        result = _pip("wheel", "--no-deps", "--no-binary", name, "-w", tmp, requirement)
        if result.returncode != 0:
            sys.exit(f"wheelhouse: building {requirement} from its sdist failed:\n{result.stderr[-3000:]}")
        (wheel,) = Path(tmp).glob("*.whl")
        if not wheel.name.endswith("-none-any.whl"):
            sys.exit(
                f"wheelhouse: {requirement} has no wheel for the target and its sdist builds {wheel.name}, "
                "a wheel for this machine only: build it on a machine like the node"
            )
        return Path(shutil.move(str(wheel), out / wheel.name))


def resolve(
    roots: list[str], target: list[str], constraints: Path, built_dir: Path, dest: Path
) -> list[Path]:
    """Download into ``dest`` the wheels of ``roots`` and all their dependencies for the target (pip download
    evaluates Requires-Python for the target Python; pip install --dry-run --target does not), building into
    ``built_dir`` those that have no wheel for it; returns the wheels so built."""
    built: list[Path] = []
    for _ in range(_MAX_SDIST_BUILDS):
        result = _pip(
            "download", *target, "--find-links", str(built_dir), "--constraint", str(constraints),
            "-d", str(dest), *roots,
        )  # fmt: skip
        if result.returncode == 0:
            return built
        missing = _NO_DISTRIBUTION.search(result.stderr)
        if missing is None:
            sys.exit(f"wheelhouse: pip could not resolve the requirements:\n{result.stderr[-3000:]}")
        print(f"wheelhouse: {missing[1]} has no wheel for the target: building it from its sdist", flush=True)
        built.append(build_pure_wheel(missing[1], built_dir))
    sys.exit(f"wheelhouse: more than {_MAX_SDIST_BUILDS} requirements need building from sdists")


def download(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    env = target_environment(args.python, args.platform)
    provided = read_provided(args.provided)
    requirements = project_requirements(ROOT / "pyproject.toml", env)
    roots = [line for line in requirements if canonicalize_name(Requirement(line).name) not in provided]
    abi = "cp" + args.python.replace(".", "")
    target = ["--only-binary=:all:", "--python-version", args.python, "--implementation", "cp"]
    target += ["--abi", abi, *(f"--platform={tag}" for tag in platform_tags(args.platform))]
    with tempfile.TemporaryDirectory() as tmp:
        constraints, built_dir, dest = Path(tmp) / "constraints.txt", Path(tmp) / "built", Path(tmp) / "all"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in provided.items() if v))
        built_dir.mkdir()
        print(f"wheelhouse: resolving {len(roots)} requirements for CPython {args.python} on {args.platform}")
        built = {path.name for path in resolve(roots, target, constraints, built_dir, dest)}
        wanted = closure([Wheel.read(path) for path in dest.glob("*.whl")], roots, provided, env)
        if out.exists():  # replaced whole: no wheel left from an earlier run for another target
            shutil.rmtree(out)
        out.mkdir(parents=True)
        for wheel in wanted:
            shutil.copy2(wheel.path, out / wheel.path.name)
    wheels = [
        {
            "file": wheel.path.name,
            "bytes": (out / wheel.path.name).stat().st_size,
            "sha256": _sha256(out / wheel.path.name),
            "built_from_sdist": wheel.path.name in built,
        }
        for wheel in wanted
    ]
    manifest = {
        "python": args.python,
        "platform": args.platform,
        "provided": args.provided,
        "provided_versions": provided,
        "requirements": requirements,
        "wheels": wheels,
        "total_bytes": sum(w["bytes"] for w in wheels),
        "command": " ".join(["python3", *sys.argv]),
        "pip": _pip("--version", quiet=False).stdout.split()[1],
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for wheel in wheels:
        print(f"  {wheel['file']:78s} {wheel['bytes'] / 2**20:6.2f} MiB")
    print(f"wheelhouse: {len(wheels)} wheels, {manifest['total_bytes'] / 2**20:.1f} MiB in {out}")
    return 0


def install(args: argparse.Namespace) -> int:
    """The offline install into the running Python; the pip log goes to ``args.log``."""
    wheelhouse = Path(args.wheelhouse).resolve()
    if not (wheelhouse / "manifest.json").is_file():
        sys.exit(f"wheelhouse: {wheelhouse} has no manifest.json (make it with `make wheelhouse`)")
    try:
        import torch
    except ImportError as error:
        sys.exit(f"wheelhouse: the site Python {sys.executable} has no torch ({error}); install torch first")
    cuda = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
    arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "setup.py's defaults")
    print(
        f"wheelhouse: torch {torch.__version__} ({cuda}) from the site; CUDA architectures: {arch}",
        flush=True,
    )
    offline = ["--no-index", "--find-links", str(wheelhouse)]
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    build_requires = [line for line in data["build-system"]["requires"] if Requirement(line).name != "torch"]
    log = Path(args.log)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        steps = [
            [*offline, *build_requires],  # --no-build-isolation: the build runs with the site's setuptools
            [*offline, "--no-build-isolation", "-v", "-e", f"{ROOT}[dev]"],
        ]
        for step in steps:
            command = [sys.executable, "-m", "pip", "install", *step]
            f.write(f"$ {' '.join(command)}\n")
            f.flush()
            rc = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT, check=False).returncode
            if rc != 0:
                break
    said = [line.strip() for line in log.read_text().splitlines() if "reclmis._C:" in line]
    for line in said:
        print(line)
    if rc != 0:
        tail = log.read_text().splitlines()[-20:]
        print("\n".join(tail), file=sys.stderr)
        print(f"wheelhouse: pip failed ({rc}); the whole log is {log}", file=sys.stderr)
        return rc
    return subprocess.run([sys.executable, "-m", "reclmis", "info"], check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    down = commands.add_parser("download", help="on a connected machine: the wheels the target site lacks")
    down.add_argument("--python", default="3.12", help="the node's Python, major.minor (default 3.12)")
    down.add_argument(
        "--platform",
        default="manylinux_2_28_x86_64",
        help="the node's wheel platform tag; older manylinux tags are accepted too (default "
        "manylinux_2_28_x86_64: x86-64 Linux with glibc >= 2.28)",
    )
    down.add_argument(
        "--provided",
        default="gpu-image",
        help=f"what the node's site already has: {' or '.join(PROFILES)} (default gpu-image), or a file of "
        "name / name==version lines",
    )
    down.add_argument("--out", default=str(DEFAULT_OUT), help="the wheelhouse folder (default ./wheelhouse)")
    down.set_defaults(handler=download)
    inst = commands.add_parser("install", help="on the node: pip install from the wheelhouse, no index")
    inst.add_argument("--wheelhouse", default=str(DEFAULT_OUT), help="default ./wheelhouse")
    inst.add_argument("--log", default=str(ROOT / "build" / "offline_install.log"), help="pip's output")
    inst.set_defaults(handler=install)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
