"""The ctypes mirror of the header: struct layouts against gcc's, a declaration for every
function, and how the library is found."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import tally
from conftest import UNBOUNDED, T, seated
from tally import _native

REPOSITORY = Path(__file__).resolve().parents[3]
HEADER = REPOSITORY / "ffi" / "include" / "tally.h"


def _c_layout(tmp_path: Path) -> dict:
    """``{struct: (size, alignment, {field: offset})}`` as gcc lays out the header's structs."""
    lines = []
    for c_name, structure in _native.STRUCTS.items():
        lines.append(
            f'printf("%s size %zu align %zu\\n", "{c_name}", sizeof(struct {c_name}), '
            f"_Alignof(struct {c_name}));"
        )
        for field_name, *_ in structure._fields_:
            lines.append(
                f'printf("%s field {field_name} %zu\\n", "{c_name}", '
                f"offsetof(struct {c_name}, {field_name}));"
            )
    program = tmp_path / "layout.c"
    program.write_text(
        '#include <stddef.h>\n#include <stdio.h>\n#include "tally.h"\n'
        "int main(void) {\n" + "\n".join(lines) + "\nreturn 0;\n}\n"
    )
    binary = tmp_path / "layout"
    subprocess.run(
        [
            "gcc",
            "-std=c11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            str(HEADER.parent),
            str(program),
            "-o",
            str(binary),
        ],
        check=True,
    )
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout
    layout: dict = {}
    for line in output.splitlines():
        struct, kind, *rest = line.split()
        entry = layout.setdefault(struct, [0, 0, {}])
        if kind == "size":
            entry[0], entry[1] = int(rest[0]), int(rest[2])
        else:
            entry[2][rest[0]] = int(rest[1])
    return layout


@pytest.mark.skipif(
    shutil.which("gcc") is None, reason="needs gcc (scripts/test-python.sh installs it)"
)
def test_every_struct_has_the_size_alignment_and_field_offsets_gcc_gives_it(tmp_path):
    layout = _c_layout(tmp_path)
    assert set(layout) == set(_native.STRUCTS)
    for c_name, structure in _native.STRUCTS.items():
        size, alignment, offsets = layout[c_name]
        assert ctypes.sizeof(structure) == size, c_name
        assert ctypes.alignment(structure) == alignment, c_name
        python_offsets = {name: getattr(structure, name).offset for name, *_ in structure._fields_}
        assert python_offsets == offsets, c_name


def test_the_header_has_no_struct_field_the_mirror_lacks():
    """gcc checks the fields the mirror names; this checks the mirror names them all."""
    text = HEADER.read_text()
    for c_name, structure in _native.STRUCTS.items():
        body = re.search(rf"typedef struct {c_name} \{{(.*?)\}} {c_name};", text, re.S)
        assert body, c_name
        code = "\n".join(line.split("//")[0] for line in body.group(1).splitlines())
        fields = re.findall(r"(\w+)(?:\[\w+\])?;", code)
        assert fields == [name for name, *_ in structure._fields_], c_name


def test_every_function_of_the_header_is_declared_and_nothing_else():
    declared = set(re.findall(r"^\S.*?\b(tally_\w+)\(", HEADER.read_text(), re.M))
    assert declared == set(_native.SIGNATURES)
    for name in _native.SIGNATURES:
        function = getattr(_native.lib, name)
        assert function.argtypes is not None, name


def test_the_constants_agree_with_the_header():
    text = HEADER.read_text()
    defines = dict(re.findall(r"^#define TALLY_(\w+) (\S+)$", text, re.M))
    assert defines["VERSION"] == f'"{tally.version()}"'
    assert int(defines["VERSION_MAJOR"]) == _native.VERSION_MAJOR
    assert int(defines["VERSION_MINOR"]) == _native.VERSION_MINOR
    for name in [
        "MAX_BATCH",
        "MAX_ID_BYTES",
        "MAX_NAME_BYTES",
        "NAME_CAPACITY",
        "MAX_DECISION_LIMITS",
        "MAX_QUANTITIES",
        "MAX_EVENTS_PER_CALL",
        "MAX_CURSORS",
        "MAX_LEASE_MS",
        "MAX_QUANTITY",
        "NOW",
    ]:
        assert int(defines[name]) == getattr(_native, name), name
    assert tally.MAX_BATCH == _native.MAX_BATCH
    assert tally.MAX_QUANTITY == _native.MAX_QUANTITY == 2**40
    for enum_name, enum in [
        ("unit", tally.Unit),
        ("charged_to", tally.ChargedTo),
        ("denial", tally.Denial),
        ("durability", tally.Durability),
    ]:
        block = re.search(rf"enum tally_{enum_name}\b.*?\{{(.*?)\}};", text, re.S).group(1)
        values = {
            m[0]: int(m[1])
            for m in re.findall(rf"TALLY_(?:{enum_name.upper()}_)?(\w+) = (\d+)", block)
        }
        assert values == {member.name: member.value for member in enum}, enum_name
    direction_block = re.search(
        r"enum tally_adjustment_direction\b.*?\{(.*?)\};", text, re.S
    ).group(1)
    direction_values = dict(re.findall(r"TALLY_ADJUST_(\w+) = (\d+)", direction_block))
    assert {k: int(v) for k, v in direction_values.items()} == {
        member.name: member.value for member in tally.AdjustmentDirection
    }
    policy_block = re.search(r"enum tally_policy_source\b.*?\{(.*?)\};", text, re.S).group(1)
    policy_values = dict(re.findall(r"TALLY_POLICY_(\w+) = (\d+)", policy_block))
    assert {k: int(v) for k, v in policy_values.items()} == {
        member.name: member.value for member in tally.PolicySource
    }


def _import_in_subprocess(env: dict) -> subprocess.CompletedProcess:
    code = "import tally, tally._native as n; print(n.library_path)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_tally_library_points_at_the_library_to_load():
    env = dict(os.environ, TALLY_LIBRARY=str(_native.library_path))
    result = _import_in_subprocess(env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(_native.library_path)

    env["TALLY_LIBRARY"] = "/nonexistent/libtally.so"
    result = _import_in_subprocess(env)
    assert result.returncode != 0
    assert "LibraryNotFound" in result.stderr and "/nonexistent/libtally.so" in result.stderr


@pytest.mark.skipif(
    shutil.which("gcc") is None, reason="needs gcc (scripts/test-python.sh installs it)"
)
def test_a_library_that_lacks_a_function_is_an_import_error_naming_it(tmp_path):
    # An older build of the same version (functions were added under 0.1.0), or another
    # libtally the system loader found: `import tally` must raise the ImportError that
    # optional-dependency code catches, naming what is missing, not an AttributeError.
    source = tmp_path / "old.c"
    source.write_text('const char *tally_version(void) { return "0.1.0"; }\n')
    library = tmp_path / "libtally.so"
    subprocess.run(["gcc", "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    code = (
        "try:\n"
        "    import tally\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__, error)\n"
    )
    env = dict(os.environ, TALLY_LIBRARY=str(library))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("LibraryNotFound"), result.stdout
    assert str(library) in result.stdout and "tally_status_name" in result.stdout


def test_every_function_is_called_without_the_gil():
    # A CDLL function releases the GIL for the call; a PyDLL one (FUNCFLAG_PYTHONAPI) holds it,
    # and threads waiting for an fsync would then wait one after another, never sharing one.
    assert type(_native.lib) is ctypes.CDLL
    for name in _native.SIGNATURES:
        assert not getattr(_native.lib, name)._flags_ & ctypes._FUNCFLAG_PYTHONAPI, name


def test_only_a_handle_the_library_just_gave_is_wrapped():
    # A pointer from anywhere else (here a live engine's and submission's own, copied) would
    # reach the library as a handle, where a wrong one crashes the process: the constructors
    # refuse it before any call, and the originals stay usable.
    with tally.Engine.in_memory(options=UNBOUNDED) as engine:
        forged = ctypes.c_void_p(engine._handle.value)
        with pytest.raises(TypeError, match="use Engine.open or Engine.in_memory"):
            tally.Engine(forged)
        with pytest.raises(TypeError, match="use Engine.open or Engine.in_memory"):
            tally.Engine(forged, object())
        key = seated(engine, "ann", "tp-ann-1", "Plus")
        submission = engine.submit(key, "m2.7", {"requests": 1}, at_ms=T)
        with pytest.raises(TypeError, match="use Engine.submit"):
            tally.Submission(engine, ctypes.c_void_p(submission._handle.value))
        assert submission.complete().admitted


def test_codes_a_newer_library_may_return_become_unknown_members_not_errors():
    # An admitted request was already counted when its decision is copied out: a code this
    # wrapper does not know must not turn that into an exception (a caller would retry it).
    raw = _native.Decision()
    raw.admitted = 1
    raw.charged_to = 9
    decision = tally.Decision.from_native(raw)
    assert decision.admitted
    assert decision.charged_to == 9
    assert decision.charged_to.name == "UNKNOWN_9"
    assert isinstance(decision.charged_to, tally.ChargedTo)
    assert decision.charged_to != tally.ChargedTo.NONE

    raw = _native.Decision()
    raw.denial = 42
    decision = tally.Decision.from_native(raw)
    assert not decision.admitted
    assert decision.denial == 42
    assert decision.denial.name == "UNKNOWN_42"
    assert decision.unit is None

    raw = _native.Decision()
    raw.denial = int(tally.Denial.OVER_REQUEST_MAXIMUM)
    raw.unit = 77
    decision = tally.Decision.from_native(raw)
    assert decision.unit == 77
    assert decision.unit.name == "UNKNOWN_77"

    # Known codes are the enums' own members, and the enums still refuse unknown values
    # when a caller constructs them.
    raw = _native.Decision()
    raw.admitted = 1
    raw.charged_to = int(tally.ChargedTo.CREDITS)
    assert tally.Decision.from_native(raw).charged_to is tally.ChargedTo.CREDITS
    with pytest.raises(ValueError):
        tally.Denial(42)
