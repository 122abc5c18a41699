package main

import (
	"fmt"
	"io"
)

// runRelay is replaced by the relay wiring; until then it refuses to start.
func runRelay(args []string, stderr io.Writer) int {
	fmt.Fprintln(stderr, "pushrelay run: not wired yet")
	return 1
}
