// composecheck loads docker compose files with compose-go, the library `docker compose config`
// is built on (schema validation, interpolation, merging), and prints the resolved project as
// JSON: the deployment tests use it where no Docker client with the compose plugin exists.
//
//	composecheck -f compose/docker-compose.yml [-f more.yml]
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
)

type files []string

func (f *files) String() string     { return strings.Join(*f, ",") }
func (f *files) Set(v string) error { *f = append(*f, v); return nil }

func main() {
	var fs files
	flag.Var(&fs, "f", "compose file (repeatable)")
	flag.Parse()
	if len(fs) == 0 {
		fmt.Fprintln(os.Stderr, "usage: composecheck -f FILE [-f FILE...]")
		os.Exit(2)
	}
	opts, err := cli.NewProjectOptions(fs, cli.WithOsEnv, cli.WithDotEnv, cli.WithName("kafkify"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	project, err := opts.LoadProject(context.Background())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, err := project.MarshalJSON()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Stdout.Write(out)
}
