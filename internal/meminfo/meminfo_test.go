package meminfo

import (
	"os"
	"testing"
)

func TestBytes(t *testing.T) {
	if _, err := os.Stat("/proc/meminfo"); err != nil {
		t.Skip("no /proc/meminfo")
	}
	total, ok1 := Bytes("MemTotal")
	avail, ok2 := Bytes("MemAvailable")
	if !ok1 || !ok2 || total == 0 || avail == 0 || avail > total {
		t.Fatalf("MemTotal %d (%v), MemAvailable %d (%v)", total, ok1, avail, ok2)
	}
	if _, ok := Bytes("NoSuchField"); ok {
		t.Fatal("a missing field was read")
	}
}
