package metrics

import (
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	prommodel "github.com/prometheus/common/model"
)

// scrape reads the handler's exposition into metric families by name.
func scrape(t *testing.T, m *Metrics) map[string]*dto.MetricFamily {
	t.Helper()
	rec := httptest.NewRecorder()
	m.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if rec.Code != 200 || !strings.HasPrefix(rec.Header().Get("Content-Type"), "text/plain") {
		t.Fatalf("scrape: %d %s", rec.Code, rec.Header().Get("Content-Type"))
	}
	p := expfmt.NewTextParser(prommodel.UTF8Validation)
	fams, err := p.TextToMetricFamilies(rec.Body)
	if err != nil {
		t.Fatal(err)
	}
	return fams
}

// What the node records is what a scrape shows, under neuro_ names, beside
// Go's and the process's collectors.
func TestRecordsAppearInTheScrape(t *testing.T) {
	m := New()
	m.ExpertCall("ok", 3*time.Millisecond)
	m.ExpertCall("ok", 5*time.Millisecond)
	m.ExpertCall("cancelled", 0)
	m.Batch(4, 2, time.Millisecond, "ok")
	m.Batch(1, 1, time.Millisecond, "busy")
	m.ShardBytes(1000)
	m.ShardBytes(-5) // ignored
	m.IdlePaused(true)
	m.IdlePaused(false)
	m.IdlePaused(true)
	n := 7.0
	m.Counter("things_total", "Things.", func() float64 { return n })
	m.Gauge("level", "A level.", func() float64 { return 2.5 })
	f := scrape(t, m)
	counter := func(name, label string) float64 {
		t.Helper()
		fam := f[name]
		if fam == nil {
			t.Fatalf("%s missing from the scrape", name)
		}
		for _, x := range fam.GetMetric() {
			if label == "" || (len(x.GetLabel()) == 1 && x.GetLabel()[0].GetValue() == label) {
				switch {
				case x.GetCounter() != nil:
					return x.GetCounter().GetValue()
				case x.GetGauge() != nil:
					return x.GetGauge().GetValue()
				case x.GetHistogram() != nil:
					return float64(x.GetHistogram().GetSampleCount())
				}
			}
		}
		t.Fatalf("%s{%s} missing", name, label)
		return 0
	}
	for _, c := range []struct {
		name, label string
		want        float64
	}{
		{"neuro_expert_calls_total", "ok", 2}, {"neuro_expert_calls_total", "cancelled", 1},
		{"neuro_expert_call_seconds", "", 2}, // only answered calls are timed
		{"neuro_expert_served_total", "ok", 2}, {"neuro_expert_served_total", "busy", 1},
		{"neuro_expert_batch_tokens", "", 2}, {"neuro_shard_fetched_bytes_total", "", 1000},
		{"neuro_idle_paused", "", 1}, {"neuro_idle_pauses_total", "", 2},
		{"neuro_things_total", "", 7}, {"neuro_level", "", 2.5},
	} {
		if got := counter(c.name, c.label); got != c.want {
			t.Errorf("%s{%s} = %v, want %v", c.name, c.label, got, c.want)
		}
	}
	if f["go_goroutines"] == nil || f["process_cpu_seconds_total"] == nil {
		t.Error("Go's and the process's collectors are missing")
	}
}

// Every method does nothing on a nil *Metrics: code paths without metrics
// need no checks.
func TestNilMetricsAreSafe(t *testing.T) {
	var m *Metrics
	m.ExpertCall("ok", time.Millisecond)
	m.Batch(1, 1, time.Millisecond, "ok")
	m.ShardBytes(1)
	m.IdlePaused(true)
	m.Counter("x", "x", func() float64 { return 0 })
	m.Gauge("y", "y", func() float64 { return 0 })
}

// Two nodes in one process keep their figures apart.
func TestRegistriesAreSeparate(t *testing.T) {
	a, b := New(), New()
	a.ShardBytes(10)
	if v := scrape(t, b)["neuro_shard_fetched_bytes_total"].GetMetric()[0].GetCounter().GetValue(); v != 0 {
		t.Fatalf("b shows a's bytes: %v", v)
	}
}
