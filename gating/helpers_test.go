package gating

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/neuro-p2p/neuro/expert"
	"github.com/neuro-p2p/neuro/model"
	"github.com/neuro-p2p/neuro/moe"
)

// splitModel generates a model of shape p in a temporary directory and
// splits it into dir/shards.
func splitModel(t testing.TB, p model.Params, dt model.DType, seed uint64) (dir string, res *model.SplitResult) {
	t.Helper()
	dir = t.TempDir()
	src := filepath.Join(dir, "m.gguf")
	f, err := os.Create(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := model.Generate(f, p, dt, seed); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if res, err = model.Split(src, filepath.Join(dir, "shards")); err != nil {
		t.Fatal(err)
	}
	return dir, res
}

// serveExperts adds every expert of a split model (splitModel's dir) to
// srv, computed by backend; wrap, if set, wraps each.
func serveExperts(t testing.TB, srv *expert.Server, dir string, res *model.SplitResult, backend moe.ExpertLoader, wrap func(moe.Expert) expert.Computer) {
	t.Helper()
	for _, ref := range res.Manifest.GetExperts() {
		s, err := model.OpenShard(filepath.Join(dir, "shards"), ref.GetShard())
		if err != nil {
			t.Fatal(err)
		}
		e, err := moe.NewExpertFromShard(backend, s, int(ref.GetLayer()), moe.ExpertOptions{Threads: 1, MaxBatch: 64})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { e.Close() })
		var c expert.Computer = e
		if wrap != nil {
			c = wrap(e)
		}
		if err := srv.Add(res.ModelCID, int(ref.GetLayer()), int(ref.GetExpert()), c); err != nil {
			t.Fatal(err)
		}
	}
}
