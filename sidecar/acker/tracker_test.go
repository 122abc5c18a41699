package acker

import (
	"math/rand/v2"
	"testing"
)

func track(t *testing.T, tr *Tracker, from, to uint64) {
	t.Helper()
	for tag := from; tag <= to; tag++ {
		if err := tr.Track(tag); err != nil {
			t.Fatal(err)
		}
	}
}

func settle(t *testing.T, tr *Tracker, o Outcome, tags ...uint64) {
	t.Helper()
	for _, tag := range tags {
		if err := tr.Settle(tag, o); err != nil {
			t.Fatal(err)
		}
	}
}

func TestAcksHighestContiguousDoneTag(t *testing.T) {
	tr := NewTracker(8)
	track(t, tr, 1, 5)
	settle(t, tr, Done, 2, 3)
	if got := tr.Flush(); got != 0 {
		t.Fatalf("tag 1 is still publishing, but Flush acks up to %d", got)
	}
	settle(t, tr, Done, 1)
	if got := tr.Flush(); got != 3 {
		t.Fatalf("Flush = %d, want 3", got)
	}
	if tr.Outstanding() != 2 {
		t.Fatalf("outstanding = %d, want 2", tr.Outstanding())
	}
	settle(t, tr, Done, 5)
	if got := tr.Flush(); got != 0 {
		t.Fatalf("tag 4 pending, Flush = %d", got)
	}
	settle(t, tr, Done, 4)
	if got := tr.Flush(); got != 5 {
		t.Fatalf("Flush = %d, want 5", got)
	}
}

func TestMultipleAckNeverEndsOnARejectedTag(t *testing.T) {
	tr := NewTracker(8)
	track(t, tr, 1, 4)
	settle(t, tr, Done, 1, 2)
	settle(t, tr, Rejected, 3)
	if got := tr.Flush(); got != 2 {
		t.Fatalf("Flush = %d, want 2: tag 3 was rejected on its own", got)
	}
	settle(t, tr, Rejected, 4)
	if got := tr.Flush(); got != 0 {
		t.Fatalf("only rejects left, Flush = %d, want 0", got)
	}
	if tr.Outstanding() != 0 {
		t.Fatalf("outstanding = %d", tr.Outstanding())
	}
	// A reject in the middle is skipped over: ack(multiple) of 7 is safe
	// because 6 was already rejected on its own, so the broker forgot it.
	track(t, tr, 5, 7)
	settle(t, tr, Done, 5, 7)
	settle(t, tr, Rejected, 6)
	if got := tr.Flush(); got != 7 {
		t.Fatalf("Flush = %d, want 7", got)
	}
}

func TestTrackerRefusesWhatWouldCloseTheChannel(t *testing.T) {
	tr := NewTracker(4)
	track(t, tr, 1, 2)
	if err := tr.Track(4); err == nil {
		t.Error("a gap in delivery tags was accepted")
	}
	if err := tr.Settle(3, Done); err == nil {
		t.Error("settling an untracked tag was accepted")
	}
	settle(t, tr, Done, 1)
	if err := tr.Settle(1, Done); err == nil {
		t.Error("double settle was accepted")
	}
	tr.Flush()
	if err := tr.Settle(1, Done); err == nil {
		t.Error("settling an acked tag was accepted")
	}
}

// TestRandomOrderNeverAcksUnfinished settles tags in random order with a
// window larger than the initial ring, checking after every flush that no
// acked tag was unfinished and that everything is acked at the end.
func TestRandomOrderNeverAcksUnfinished(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	tr := NewTracker(16)
	const total = 20000
	outcome := make([]Outcome, total+1)
	var open []uint64
	var next, acked uint64 = 1, 0
	for acked < total || len(open) > 0 {
		for next <= total && len(open) < 300 && rng.IntN(3) > 0 {
			track(t, tr, next, next)
			open = append(open, next)
			next++
		}
		if len(open) > 0 {
			i := rng.IntN(len(open))
			tag := open[i]
			open = append(open[:i], open[i+1:]...)
			o := Done
			if rng.IntN(50) == 0 {
				o = Rejected
			}
			outcome[tag] = o
			settle(t, tr, o, tag)
		}
		if up := tr.Flush(); up != 0 {
			if outcome[up] != Done {
				t.Fatalf("acked up to %d, whose outcome is %d", up, outcome[up])
			}
			for tag := acked + 1; tag <= up; tag++ {
				if outcome[tag] == Pending {
					t.Fatalf("ack up to %d covers unfinished tag %d", up, tag)
				}
			}
			acked = up
		}
		if next > total && len(open) == 0 {
			break
		}
	}
	if tr.Outstanding() != 0 {
		t.Fatalf("%d tags never released", tr.Outstanding())
	}
}

func BenchmarkTrackSettleFlush(b *testing.B) {
	tr := NewTracker(1024)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		tag := uint64(i + 1)
		_ = tr.Track(tag)
		_ = tr.Settle(tag, Done)
		if tag%64 == 0 {
			tr.Flush()
		}
	}
}
