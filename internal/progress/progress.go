// Package progress draws progress bars (github.com/schollz/progressbar) for
// the long steps a person waits for: splitting and importing a model,
// fetching shards, a testnet coming up. On anything but a terminal it
// draws nothing, so logs and pipes stay clean.
package progress

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// Reporter makes bars on one writer.
type Reporter struct {
	w  io.Writer
	on bool
}

// New draws on w when w is a terminal, and nowhere otherwise.
func New(w io.Writer) *Reporter {
	f, ok := w.(*os.File)
	return &Reporter{w: w, on: ok && term.IsTerminal(int(f.Fd()))}
}

// On reports whether bars are drawn.
func (r *Reporter) On() bool { return r != nil && r.on }

// Bar is a bar of total steps (total < 0: unknown); with bytes it counts
// bytes and shows the rate. Bars of a nil or quiet Reporter draw nothing.
func (r *Reporter) Bar(total int64, desc string, bytes bool) *progressbar.ProgressBar {
	opts := []progressbar.Option{
		progressbar.OptionSetDescription(desc),
		progressbar.OptionSetVisibility(r.On()),
		progressbar.OptionSetWidth(30),
		progressbar.OptionShowCount(),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionThrottle(100 * time.Millisecond),
		progressbar.OptionClearOnFinish(),
	}
	if r != nil {
		opts = append(opts, progressbar.OptionSetWriter(r.w))
	} else {
		opts = append(opts, progressbar.OptionSetWriter(io.Discard))
	}
	if bytes {
		opts = append(opts, progressbar.OptionShowBytes(true), progressbar.OptionShowTotalBytes(true))
	}
	return progressbar.NewOptions64(total, opts...)
}

// Fetches shows shard fetches: a bar for the shard being fetched (bytes,
// rate, ETA) whose description counts the shards and bytes fetched so far
// in all. It has the shape of expert.Progress.
func (r *Reporter) Fetches() func(name string, done, total int64) {
	var (
		mu      sync.Mutex
		bar     *progressbar.ProgressBar
		current string
		shards  int
		bytes   int64
	)
	return func(name string, done, total int64) {
		mu.Lock()
		defer mu.Unlock()
		if name != current {
			if bar != nil {
				_ = bar.Finish()
			}
			current = name
			short := name
			if len(short) > 10 {
				short = "…" + short[len(short)-8:]
			}
			bar = r.Bar(total, fmt.Sprintf("fetching shard %s (%d fetched, %.1f MiB in all)", short, shards, float64(bytes)/(1<<20)), true)
		}
		_ = bar.Set64(done)
		if done >= total {
			_ = bar.Finish()
			shards++
			bytes += total
			bar, current = nil, ""
		}
	}
}
