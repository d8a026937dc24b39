"""Check that the running environment holds exactly what requirements.txt pins.

CI runs it in the fresh virtual environment it builds (`python tools/check_lock.py`): any installed
package that the lock does not pin, or pins at another version, fails the run, so a missing pin
cannot hide behind packages preinstalled on a machine. A local build label (torch 2.13.0+cpu) counts
as the version it labels. pip itself is the installer, not part of the course, and is not checked.
"""
import re
import sys
from importlib import metadata
from pathlib import Path

LOCK = Path(__file__).resolve().parent.parent / "requirements.txt"
NOT_CHECKED = {"pip"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions(lock_text: str) -> dict:
    pins = {}
    for line in lock_text.splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", line)
        if match:
            pins[normalize(match.group(1))] = match.group(2)
    return pins


def main() -> int:
    pins = pinned_versions(LOCK.read_text())
    problems = []
    installed = {normalize(d.metadata["Name"]): d.version for d in metadata.distributions()}
    for name, version in sorted(installed.items()):
        if name in NOT_CHECKED:
            continue
        if name not in pins:
            problems.append(f"{name}=={version} is installed but not pinned in requirements.txt")
        elif version.split("+")[0] != pins[name].split("+")[0]:
            problems.append(f"{name}=={version} is installed, requirements.txt pins {pins[name]}")
    missing = sorted(set(pins) - set(installed))
    problems += [f"{name}=={pins[name]} is pinned but not installed" for name in missing]
    for problem in problems:
        print("lock check:", problem)
    print(f"lock check: {len(installed) - len(NOT_CHECKED & set(installed))} installed packages, "
          f"{len(pins)} pinned, {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
