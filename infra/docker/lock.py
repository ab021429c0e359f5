"""Write a pip lock file (name==version plus sha256 hashes) for the images' Linux x86_64 / CPython
3.11 platform, from pip's own resolver: `pip install --dry-run --report` for that platform.

    cd infra/docker
    python lock.py requirements.lock -r requirements.in
    python lock.py mlflow-requirements.lock -r mlflow-requirements.in
    python lock.py gpu-requirements.lock -r gpu-requirements.in        # the GPU image's additions
    python lock.py cpu-requirements.lock --on-top-of requirements.lock -r cpu-requirements.in
    python lock.py torch-gpu-requirements.lock --on-top-of requirements.lock -r torch-gpu-requirements.in
    python lock.py torch-cpu-requirements.lock --on-top-of requirements.lock -r torch-cpu-requirements.in

`--on-top-of BASE.lock`: resolve with BASE's versions as constraints and write only what BASE lacks, so
that the image can install BASE and then this lock (torch's CUDA wheels, say) without a second version
of anything. The images install with `pip install --require-hashes --no-deps -r <lock>`, so a build
gets exactly these files or fails.

torch-cpu-requirements.lock needs PyTorch's own index (download.pytorch.org, where the +cpu builds
live); it has not been written yet: that index was not reachable where these locks were made.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

# Wheels for glibc 2.17 to 2.28: they install on every image here (the Ray images are Ubuntu 24.04,
# glibc 2.39). pip takes an explicit --platform list literally (manylinux_2_28 does not imply 2_27, the
# tag of several CUDA wheels), so each one is named.
PLATFORM = ["--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
            *[arg for minor in range(28, 16, -1) for arg in ("--platform", f"manylinux_2_{minor}_x86_64")],
            "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]


def locked_versions(lock: Path) -> dict[str, str]:
    """{name: version} of a lock file this script wrote."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^([\w.-]+)==(\S+) \\$", lock.read_text(), re.M)}


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(out: str, *args: str) -> None:
    here = Path(__file__).parent
    command = " ".join(["infra/docker/lock.py", out, *args])
    args = list(args)
    base: dict[str, str] = {}
    if "--on-top-of" in args:
        i = args.index("--on-top-of")
        base = locked_versions(here / args[i + 1])
        del args[i:i + 2]
    with tempfile.TemporaryDirectory() as tmp:
        report, constraints = Path(tmp) / "report.json", Path(tmp) / "constraints.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in base.items()))
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--target", tmp, "--report", str(report), *PLATFORM, "-c", str(constraints), *args],
                       check=True, cwd=here,
                       # PyPI alone: no local wheel folders, mirrors or constraints of this machine.
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
                            "PIP_CONFIG_FILE": os.devnull})
        installs = json.loads(report.read_text())["install"]
    skip = {normalized(name) for name in base}
    lines = [f"# Written by {command} (Linux x86_64, CPython 3.11)."]
    for item in sorted(installs, key=lambda i: i["metadata"]["name"].lower()):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if normalized(name) in skip:
            continue
        digest = item["download_info"]["archive_info"]["hashes"]["sha256"]
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{digest}")
    (here / out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
