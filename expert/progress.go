package expert

import (
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/ipfs/go-cid"
)

// TerminalProgress draws one line per fetch on w (a terminal): bytes done
// of total, rate and time left, at most ten times a second, and a final
// line when the blob is complete.
func TerminalProgress(w io.Writer) Progress {
	var (
		mu    sync.Mutex
		start = map[cid.Cid]time.Time{}
		last  = map[cid.Cid]time.Time{}
	)
	return func(c cid.Cid, done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		now := time.Now()
		if _, ok := start[c]; !ok {
			start[c] = now
		}
		if done < total && now.Sub(last[c]) < 100*time.Millisecond {
			return
		}
		last[c] = now
		took := now.Sub(start[c]).Seconds()
		rate := float64(done) / max(took, 1e-3)
		eta := "-"
		if rate > 0 && done < total {
			eta = (time.Duration(float64(total-done)/rate) * time.Second / time.Second).Round(time.Second).String()
		}
		s := c.String()
		name := s[len(s)-8:]
		pct := 100.0
		if total > 0 {
			pct = 100 * float64(done) / float64(total)
		}
		fmt.Fprintf(w, "\rfetching …%s %5.1f%% %8.1f / %.1f MiB  %6.1f MiB/s  ETA %s   ",
			name, pct, float64(done)/(1<<20), float64(total)/(1<<20), rate/(1<<20), eta)
		if done >= total {
			fmt.Fprintln(w)
			delete(start, c)
			delete(last, c)
		}
	}
}
