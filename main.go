package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
)

func main() {
	err := run(context.Background(), os.Args, os.Getenv, os.Stdin, os.Stdout, os.Stderr)
	os.Exit(exitCode(err, os.Stderr))
}

// exitStatus is returned by run when the message has already been printed
// (auth status, flag errors) and only the process status remains to be set.
type exitStatus int

func (e exitStatus) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

// usageError is a command-line mistake: it is printed with a pointer to
// `ccproxy help` and exits 2.
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

// usagef returns a usageError.
func usagef(format string, args ...any) error { return &usageError{fmt.Sprintf(format, args...)} }

// exitCode prints err the way the user should see it and returns the status.
func exitCode(err error, stderr io.Writer) int {
	var st exitStatus
	var ue *usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &st):
		return int(st)
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "ccproxy: %s\nrun `ccproxy help` for usage\n", ue.msg)
		return 2
	default:
		fmt.Fprintf(stderr, "ccproxy: %s\n", err)
		return 1
	}
}

// run is the whole program; main only supplies the operating system.
func run(ctx context.Context, args []string, getenv func(string) string, stdin io.Reader, stdout, stderr io.Writer) error {
	return nil
}
