// Package telemetry is the relay's one metrics registry: a VictoriaMetrics
// Set plus the HELP text and TYPE of every family, written in Prometheus
// text format by WritePrometheus.
//
// The metrics library can only add empty HELP lines, and only through a
// process-wide switch; keeping the metadata here instead lets every family
// carry a real description and keeps the process free of global state.
package telemetry

import (
	"bufio"
	"bytes"
	"io"
	"strings"
	"sync"

	"github.com/VictoriaMetrics/metrics"
)

// Registry owns the metric set and the metadata of its families.
type Registry struct {
	set *metrics.Set

	mu   sync.Mutex
	meta map[string]familyMeta // family name → metadata
}

type familyMeta struct{ typ, help string }

// New returns an empty registry.
func New() *Registry {
	return &Registry{set: metrics.NewSet(), meta: make(map[string]familyMeta)}
}

// Set is the underlying metrics set, for RegisterMetricsWriter and the like.
// Families written that way should be described with Describe.
func (r *Registry) Set() *metrics.Set { return r.set }

// Describe records the TYPE and HELP of a metric family (the name without
// labels). typ is one of counter, gauge, histogram.
func (r *Registry) Describe(family, typ, help string) {
	r.mu.Lock()
	r.meta[family] = familyMeta{typ: typ, help: help}
	r.mu.Unlock()
}

// Counter returns the counter name (which may carry labels), creating it.
func (r *Registry) Counter(name, help string) *metrics.Counter {
	r.Describe(family(name), "counter", help)
	return r.set.GetOrCreateCounter(name)
}

// Gauge returns a gauge whose value is f(), creating it. A nil f gives a
// settable gauge.
func (r *Registry) Gauge(name, help string, f func() float64) *metrics.Gauge {
	r.Describe(family(name), "gauge", help)
	return r.set.GetOrCreateGauge(name, f)
}

// Histogram returns a Prometheus-style (le buckets) histogram, creating it.
func (r *Registry) Histogram(name, help string, upperBounds []float64) *metrics.PrometheusHistogram {
	r.Describe(family(name), "histogram", help)
	return r.set.GetOrCreatePrometheusHistogramExt(name, upperBounds)
}

// WritePrometheus writes every metric in the text exposition format, with
// HELP and TYPE lines before the first sample of each described family.
func (r *Registry) WritePrometheus(w io.Writer) {
	var buf bytes.Buffer
	r.set.WritePrometheus(&buf)

	r.mu.Lock()
	defer r.mu.Unlock()
	bw := bufio.NewWriter(w)
	seen := make(map[string]bool, len(r.meta))
	for _, line := range bytes.SplitAfter(buf.Bytes(), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		if line[0] != '#' {
			fam := sampleFamily(string(line))
			if m, ok := r.lookup(fam); ok && !seen[m.name] {
				seen[m.name] = true
				bw.WriteString("# HELP " + m.name + " " + m.help + "\n")
				bw.WriteString("# TYPE " + m.name + " " + m.typ + "\n")
			}
		}
		bw.Write(line)
	}
	bw.Flush()
}

type namedMeta struct {
	name string
	familyMeta
}

// lookup finds the family of a sample name, trying the histogram suffixes.
func (r *Registry) lookup(sample string) (namedMeta, bool) {
	if m, ok := r.meta[sample]; ok {
		return namedMeta{sample, m}, true
	}
	for _, suffix := range []string{"_bucket", "_sum", "_count"} {
		base, ok := strings.CutSuffix(sample, suffix)
		if !ok {
			continue
		}
		if m, ok := r.meta[base]; ok && m.typ == "histogram" {
			return namedMeta{base, m}, true
		}
	}
	return namedMeta{}, false
}

// family strips the label set from a metric name.
func family(name string) string {
	if i := strings.IndexByte(name, '{'); i >= 0 {
		return name[:i]
	}
	return name
}

// sampleFamily returns the metric name of one exposition line.
func sampleFamily(line string) string {
	if i := strings.IndexAny(line, "{ "); i >= 0 {
		return line[:i]
	}
	return strings.TrimSpace(line)
}
