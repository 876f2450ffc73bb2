// Package meminfo reads Linux's /proc/meminfo.
package meminfo

import (
	"bufio"
	"os"
	"strconv"
	"strings"
)

// Bytes returns the field name of /proc/meminfo ("MemTotal",
// "MemAvailable") in bytes; false where it cannot be read (not Linux, no
// such field).
func Bytes(name string) (uint64, bool) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0, false
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), name+":"); ok {
			kb, err := strconv.ParseUint(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			return kb << 10, err == nil
		}
	}
	return 0, false
}
