"""Write a pip lock file (name==version plus sha256 hashes) for the images' Linux x86_64 / CPython
3.11 platform, from pip's own resolver: `pip install --dry-run --report` for that platform.

    cd infra/docker
    python lock.py requirements.lock -r requirements.in
    python lock.py mlflow-requirements.lock -r mlflow-requirements.in
    python lock.py gpu-requirements.lock -r gpu-requirements.in        # the GPU image's additions

The images install with `pip install --require-hashes --no-deps -r <lock>`, so a build gets exactly
these files or fails. torch is not in the lock (project.Dockerfile pins it by version per image:
its CUDA libraries could not be resolved from the registry reachable where this lock was made).
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

PLATFORM = ["--python-version", "3.11", "--implementation", "cp", "--only-binary=:all:",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
            "--platform", "manylinux2014_x86_64", "--platform", "linux_x86_64"]



def main(out: str, *requirements: str) -> None:
    here = Path(__file__).parent
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
                        "--target", tmp, "--report", str(report), *PLATFORM, *requirements],
                       check=True, cwd=here,
                       # PyPI alone: no local wheel folders, mirrors or constraints of this machine.
                       env={**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")},
                            "PIP_CONFIG_FILE": os.devnull})
        installs = json.loads(report.read_text())["install"]
    args = " ".join(requirements)
    lines = [f"# Written by infra/docker/lock.py {out} {args} (Linux x86_64, CPython 3.11)."]
    for item in sorted(installs, key=lambda i: i["metadata"]["name"].lower()):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        digest = item["download_info"]["archive_info"]["hashes"]["sha256"]
        lines.append(f"{name}=={version} \\\n    --hash=sha256:{digest}")
    (here / out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], *sys.argv[2:])
