#!/usr/bin/env python3
"""Instructions per call of one function, broken down by the functions inlined into it.

callgrind_annotate attributes an inlined function's instructions to source lines only, so on the
admission path (one big `decide` with everything inlined) it shows forty lines of 5-20 each and
no structure. This reads a callgrind profile taken with `--dump-instr=yes`, asks `addr2line -i`
for each executed instruction's chain of inlined frames, and sums the instructions under every
frame of the chain (inclusive) and under the innermost frame and line (self).

    HOTLOOP_ROUNDS=1 valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file=/tmp/cg.out \\
        target/release/examples/hotloop 1
    scripts/callgrind-inline.py /tmp/cg.out target/release/examples/hotloop \\
        'tally_engine::engine::Engine::decide' 400000

CALLS divides the counts (hotloop with one round calls `decide` 400,000 times: 200,000 each from
`consume` and `consume_into`). Costs of functions that are called, not inlined (`memcmp`,
`RollingWindow::advance`), are not included. The executable must be a position-independent one
that valgrind loads at its link address (it does for Rust's default PIE: offsets then match).
"""

import collections
import re
import subprocess
import sys


def position(token, last):
    if token == "*":
        return last
    if token.startswith("+"):
        return last + int(token[1:], 0)
    if token.startswith("-"):
        return last - int(token[1:], 0)
    return int(token, 0)


def costs_of(profile, target):
    """Instructions executed at each address of functions whose name contains `target`."""
    names, costs = {}, collections.Counter()
    function, last_address, last_line, skip_next = None, 0, 0, False
    with open(profile) as lines:
        for line in lines:
            line = line.rstrip("\n")
            named = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line)
            if named:
                if named.group(2):
                    names[named.group(1)] = named.group(2)
                if line.startswith("fn="):
                    function = names.get(named.group(1))
                continue
            if line.startswith("calls="):
                skip_next = True  # the next cost line is the call's inclusive cost
                continue
            if not line or not (line[0].isdigit() or line[0] in "+-*"):
                continue
            tokens = line.split()
            if len(tokens) < 3:
                continue
            address = position(tokens[0], last_address)
            source_line = position(tokens[1], last_line)
            last_address, last_line = address, source_line
            if skip_next:
                skip_next = False
                continue
            if function and target in function:
                costs[address] += int(tokens[2])
    return costs


def inline_chain(binary, address):
    """[(function, file:line)], innermost first."""
    out = subprocess.run(
        ["addr2line", "-i", "-f", "-C", "-e", binary, hex(address)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    return [
        (re.sub(r"<.*>", "<>", out[k]), out[k + 1].rsplit("/", 1)[-1])
        for k in range(0, len(out) - 1, 2)
    ]


def main():
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    profile, binary, target, calls = (
        sys.argv[1],
        sys.argv[2],
        sys.argv[3],
        float(sys.argv[4]),
    )
    costs = costs_of(profile, target)
    if not costs:
        sys.exit(f"no instructions of a function named like {target!r} in {profile}")
    inclusive, own = collections.Counter(), collections.Counter()
    for address, cost in costs.items():
        chain = inline_chain(binary, address)
        for function in dict.fromkeys(name for name, _ in chain):
            inclusive[function] += cost
        if chain:
            own[f"{chain[0][0]} @ {chain[0][1]}"] += cost
    print(f"{sum(costs.values()) / calls:8.1f}  per call in all")
    print("inclusive, by inlined function:")
    for function, cost in inclusive.most_common(50):
        print(f"{cost / calls:8.1f}  {function[:140]}")
    print("self, by innermost function and line:")
    for place, cost in own.most_common(40):
        print(f"{cost / calls:8.1f}  {place[:140]}")


if __name__ == "__main__":
    main()
