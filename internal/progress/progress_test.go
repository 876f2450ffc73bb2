package progress

import (
	"bytes"
	"strings"
	"testing"
)

// Off a terminal nothing is drawn; on one, a fetch shows its shard, bytes
// and the running totals.
func TestFetches(t *testing.T) {
	var quiet bytes.Buffer
	show := New(&quiet).Fetches()
	show("bafkreihghcrt42q3xioms6eynwvep4ler7m5wmr6owaafrwl27hvacwvee", 0, 2<<20)
	show("bafkreihghcrt42q3xioms6eynwvep4ler7m5wmr6owaafrwl27hvacwvee", 2<<20, 2<<20)
	if quiet.Len() != 0 {
		t.Fatalf("drawn off a terminal: %q", quiet.String())
	}
	var tty bytes.Buffer
	show = (&Reporter{w: &tty, on: true}).Fetches()
	show("bafkreiaaaa", 0, 2<<20)
	show("bafkreiaaaa", 2<<20, 2<<20)
	show("bafkreibbbb", 0, 1<<20)
	out := tty.String()
	if !strings.Contains(out, "fetching shard …kreiaaaa (0 fetched") || !strings.Contains(out, "…kreibbbb (1 fetched, 2.0 MiB in all)") ||
		!strings.Contains(out, "2.1 MB") {
		t.Fatalf("progress output %q", out)
	}
}
