package tally

import (
	"errors"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// The header is the authority: these tests read its enums and compare the package's tables
// with them, so a status (or unit, denial, charge) added in C without its Go mapping fails
// here, not at run time in a user's process (where a status it lacks matches no sentinel).

const headerPath = "../include/tally.h"

// headerEnum returns the values of `enum name` in the header, by constant name.
func headerEnum(t *testing.T, header, name string) map[string]uint32 {
	t.Helper()
	block := regexp.MustCompile(`(?s)enum ` + name + `\b[^{]*\{(.*?)\};`).FindStringSubmatch(header)
	if block == nil {
		t.Fatalf("no enum %s in %s", name, headerPath)
	}
	values := map[string]uint32{}
	for _, m := range regexp.MustCompile(`(?m)^\s*(TALLY_\w+) = (\d+),`).FindAllStringSubmatch(block[1], -1) {
		value, err := strconv.ParseUint(m[2], 10, 32)
		if err != nil {
			t.Fatal(err)
		}
		values[m[1]] = uint32(value)
	}
	if len(values) == 0 {
		t.Fatalf("enum %s has no values", name)
	}
	return values
}

func readHeader(t *testing.T) string {
	t.Helper()
	header, err := os.ReadFile(headerPath)
	if err != nil {
		t.Fatal(err)
	}
	return string(header)
}

// sentinelNames maps each sentinel's message to its variable's name, read from errors.go.
func sentinelNames(t *testing.T) map[string]string {
	t.Helper()
	file, err := parser.ParseFile(token.NewFileSet(), "errors.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]string{}
	ast.Inspect(file, func(node ast.Node) bool {
		spec, ok := node.(*ast.ValueSpec)
		if !ok || len(spec.Names) != 1 || len(spec.Values) != 1 {
			return true
		}
		call, ok := spec.Values[0].(*ast.CallExpr)
		if !ok || len(call.Args) != 1 {
			return true
		}
		if literal, ok := call.Args[0].(*ast.BasicLit); ok && literal.Kind == token.STRING {
			message, err := strconv.Unquote(literal.Value)
			if err != nil {
				t.Fatal(err)
			}
			names[message] = spec.Names[0].Name
		}
		return true
	})
	return names
}

// squash is a name without its prefix, underscores and case: TALLY_REQUEST_ID_CONFLICT and
// ErrRequestIDConflict are both "requestidconflict".
func squash(name, prefix string) string {
	return strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(name, prefix), "_", ""))
}

// statusTableProblems says how the package's status table differs from the header's statuses.
func statusTableProblems(statuses map[string]uint32, sentinels map[string]string) []string {
	var problems []string
	for name, code := range statuses {
		status := Status(code)
		if code == 0 {
			continue
		}
		if status > lastStatus || int(code) >= len(statusErrors) {
			problems = append(problems, fmt.Sprintf("%s (%d) has no sentinel (the table ends at %d)", name, code, lastStatus))
			continue
		}
		variable := sentinels[statusErrors[code].Error()]
		if squash(variable, "Err") != squash(name, "TALLY_") {
			problems = append(problems, fmt.Sprintf("%s (%d) maps to %s", name, code, variable))
		}
		if got := status.String(); got != name {
			problems = append(problems, fmt.Sprintf("%d is %s in the header but %s in the library", code, name, got))
		}
	}
	if len(statusErrors)-1 != len(statuses)-1 {
		problems = append(problems, fmt.Sprintf("the table has %d statuses, the header %d", len(statusErrors)-1, len(statuses)-1))
	}
	return problems
}

func TestEveryStatusOfTheHeaderHasItsOwnSentinelNamedAfterIt(t *testing.T) {
	statuses := headerEnum(t, readHeader(t), "tally_status")
	sentinels := sentinelNames(t)
	if problems := statusTableProblems(statuses, sentinels); len(problems) > 0 {
		t.Fatalf("the status table does not match %s:\n%s", headerPath, strings.Join(problems, "\n"))
	}
	seen := map[error]Status{}
	for name, code := range statuses {
		if code == 0 {
			continue
		}
		err := newError("Test", Status(code), "detail")
		sentinel := statusErrors[code]
		if !errors.Is(err, sentinel) || StatusOf(err) != Status(code) || !strings.Contains(err.Error(), name) {
			t.Errorf("%s: %v", name, err)
		}
		if other, ok := seen[sentinel]; ok {
			t.Errorf("%s and %s share a sentinel", name, other)
		}
		seen[sentinel] = Status(code)
	}
	// The first code past the header's last one is unknown to the library and the package.
	next := Status(len(statuses))
	if next.String() != "TALLY_UNKNOWN_STATUS" {
		t.Errorf("the library knows %d as %s, which the header lacks", next, next)
	}
	// A newer library's status: an Error that matches no sentinel.
	if err := newError("Test", next, ""); StatusOf(err) != next || errors.Unwrap(err) != nil {
		t.Errorf("status %d, past the header's: %#v", next, err)
	}
}

func TestTheStatusCheckCatchesAStatusAddedInCWithoutASentinel(t *testing.T) {
	statuses := headerEnum(t, readHeader(t), "tally_status")
	statuses["TALLY_SOMETHING_NEW"] = uint32(len(statuses))
	problems := statusTableProblems(statuses, sentinelNames(t))
	if len(problems) == 0 || !strings.Contains(strings.Join(problems, "\n"), "TALLY_SOMETHING_NEW") {
		t.Fatalf("a status the package lacks went unnoticed: %q", problems)
	}
}

func TestTheUnitDenialAndChargedToNamesCoverTheHeadersEnums(t *testing.T) {
	header := readHeader(t)
	for _, c := range []struct {
		enum, prefix string
		name         func(uint32) string
	}{
		{"tally_unit", "TALLY_UNIT_", func(v uint32) string { return Unit(v).String() }},
		{"tally_denial", "TALLY_DENIAL_", func(v uint32) string { return Denial(v).String() }},
		{"tally_charged_to", "TALLY_CHARGED_TO_", func(v uint32) string { return ChargedTo(v).String() }},
		{"tally_adjustment_direction", "TALLY_ADJUST_", func(v uint32) string { return AdjustmentDirection(v).String() }},
	} {
		for constant, value := range headerEnum(t, header, c.enum) {
			want := strings.ToLower(strings.TrimPrefix(constant, c.prefix))
			if got := c.name(value); got != want {
				t.Errorf("%s (%d): the package names it %q", constant, value, got)
			}
		}
	}
}
