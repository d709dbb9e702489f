"""What benchmark JSON records: the command as it was typed."""

import argparse
import json

from mirage_env.benchreport import header, typed_command, write_json


def test_the_console_script_is_recorded_once_with_its_subcommands():
    argv = ["/venv/bin/mirage-env", "bench", "memory", "--json", "out.json"]
    orig_argv = ["/venv/bin/python", *argv]
    assert typed_command(argv, orig_argv) == "mirage-env bench memory --json out.json"


def test_a_script_and_a_module_are_recorded_as_typed():
    script = ["benchmarks/memory.py", "--steps", "5"]
    assert typed_command(script, ["/usr/bin/python3", *script]) == "python benchmarks/memory.py --steps 5"
    module = ["/repo/mirage_env/cli.py", "bench", "memory"]
    orig = ["python", "-m", "mirage_env.cli", "bench", "memory"]
    assert typed_command(module, orig) == "python -m mirage_env.cli bench memory"


def test_arguments_with_spaces_are_quoted_so_the_line_can_be_pasted():
    argv = ["/venv/bin/mirage-env", "bench", "memory", "--json", "my results.json"]
    assert typed_command(argv, argv) == "mirage-env bench memory --json 'my results.json'"


def test_header_and_write_json_round_trip(tmp_path, capsys):
    args = argparse.Namespace(steps=5, func=print)  # the CLI's callable is left out
    path = tmp_path / "sub" / "out.json"
    write_json(path, header(args) | {"ms": 1.5})
    data = json.loads(path.read_text())
    assert data["config"] == {"steps": 5} and data["ms"] == 1.5
    assert {"command", "machine"} <= set(data) and "torch_threads" in data["machine"]
    assert capsys.readouterr().out == f"wrote {path}\n"
    write_json(None, data)  # no path: nothing written, nothing said
    assert capsys.readouterr().out == ""
