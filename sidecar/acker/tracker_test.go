package acker

import (
	"math/rand/v2"
	"slices"
	"testing"
)

func track(t *testing.T, tr *Tracker, from, to uint64) {
	t.Helper()
	for tag := from; tag <= to; tag++ {
		if err := tr.Track(tag, 0); err != nil {
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
	if got, _ := tr.Flush(false); got != 0 {
		t.Fatalf("tag 1 is still publishing, but Flush acks up to %d", got)
	}
	settle(t, tr, Done, 1)
	if got, _ := tr.Flush(false); got != 3 {
		t.Fatalf("Flush = %d, want 3", got)
	}
	if tr.Outstanding() != 2 {
		t.Fatalf("outstanding = %d, want 2", tr.Outstanding())
	}
	settle(t, tr, Done, 5)
	if got, _ := tr.Flush(false); got != 0 {
		t.Fatalf("tag 4 pending, Flush = %d", got)
	}
	settle(t, tr, Done, 4)
	if got, _ := tr.Flush(false); got != 5 {
		t.Fatalf("Flush = %d, want 5", got)
	}
}

func TestMultipleAckNeverEndsOnARejectedTag(t *testing.T) {
	tr := NewTracker(8)
	track(t, tr, 1, 4)
	settle(t, tr, Done, 1, 2)
	settle(t, tr, Rejected, 3)
	if got, _ := tr.Flush(false); got != 2 {
		t.Fatalf("Flush = %d, want 2: tag 3 was rejected on its own", got)
	}
	settle(t, tr, Rejected, 4)
	if got, _ := tr.Flush(false); got != 0 {
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
	if got, _ := tr.Flush(false); got != 7 {
		t.Fatalf("Flush = %d, want 7", got)
	}
}

func TestTrackerRefusesWhatWouldCloseTheChannel(t *testing.T) {
	tr := NewTracker(4)
	track(t, tr, 1, 2)
	if err := tr.Track(4, 0); err == nil {
		t.Error("a gap in delivery tags was accepted")
	}
	if err := tr.Settle(3, Done); err == nil {
		t.Error("settling an untracked tag was accepted")
	}
	settle(t, tr, Done, 1)
	if err := tr.Settle(1, Done); err == nil {
		t.Error("double settle was accepted")
	}
	tr.Flush(false)
	if err := tr.Settle(1, Done); err == nil {
		t.Error("settling an acked tag was accepted")
	}
}

// TestRandomOrderNeverAcksUnfinished settles tags in random order with a
// window larger than the initial ring, flushing now and then as stalled,
// against a model of the broker: a multiple-ack releases every unacked
// tag up to it, a single ack one tag. No ack may release an unfinished tag
// or name a tag the broker no longer holds (that closes the channel), and
// at the end every Done tag has been acked.
func TestRandomOrderNeverAcksUnfinished(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	tr := NewTracker(16)
	const total = 20000
	outcome := make([]Outcome, total+1)
	held := make([]bool, total+1) // the broker still holds the delivery
	var open []uint64
	next, low := uint64(1), uint64(1) // low: no held tag below it
	release := func(tag uint64) {
		if !held[tag] {
			t.Fatalf("ack of tag %d, which the broker no longer holds", tag)
		}
		if outcome[tag] == Pending {
			t.Fatalf("ack releases unfinished tag %d", tag)
		}
		held[tag] = false
	}
	for next <= total || len(open) > 0 {
		for next <= total && len(open) < 300 && rng.IntN(3) > 0 {
			track(t, tr, next, next)
			held[next] = true
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
				held[tag] = false // the caller rejects it on its own
			}
			outcome[tag] = o
			settle(t, tr, o, tag)
		}
		up, singles := tr.Flush(rng.IntN(4) == 0)
		if up != 0 {
			if outcome[up] != Done || !held[up] {
				t.Fatalf("multiple-ack names tag %d (outcome %d, held %v)", up, outcome[up], held[up])
			}
			for tag := low; tag <= up; tag++ {
				if held[tag] {
					release(tag)
				}
			}
			low = up + 1
		}
		for _, tag := range singles {
			if outcome[tag] != Done {
				t.Fatalf("single ack of tag %d with outcome %d", tag, outcome[tag])
			}
			release(tag)
		}
	}
	for tag := uint64(1); tag <= total; tag++ {
		if held[tag] {
			t.Fatalf("tag %d (outcome %d) never acked", tag, outcome[tag])
		}
	}
	if tr.Outstanding() != 0 {
		t.Fatalf("%d tags never released", tr.Outstanding())
	}
}

// TestStalledHeadLetsLaterTagsGo: with tag 1 stuck, the later tags are
// acked one by one (so the broker's prefetch window moves), and when tag 1
// finally settles, the multiple-ack names it alone, never an acked tag.
func TestStalledHeadLetsLaterTagsGo(t *testing.T) {
	tr := NewTracker(8)
	for tag := uint64(1); tag <= 5; tag++ {
		if err := tr.Track(tag, int64(tag*10)); err != nil {
			t.Fatal(err)
		}
	}
	settle(t, tr, Done, 2, 3, 5)
	if up, singles := tr.Flush(false); up != 0 || singles != nil {
		t.Fatalf("not stalled: Flush = %d %v, want nothing", up, singles)
	}
	up, singles := tr.Flush(true)
	if up != 0 || !slices.Equal(singles, []uint64{2, 3, 5}) {
		t.Fatalf("stalled: Flush = %d %v, want 0 [2 3 5]", up, singles)
	}
	if got := tr.Outstanding(); got != 2 {
		t.Fatalf("outstanding %d, want 2 (tags 1 and 4)", got)
	}
	if at, ok := tr.Oldest(); !ok || at != 10 {
		t.Fatalf("oldest = %d %v, want tag 1's 10", at, ok)
	}
	settle(t, tr, Done, 1)
	if up, singles := tr.Flush(true); up != 1 || singles != nil {
		t.Fatalf("after tag 1: Flush = %d %v, want 1 and no singles", up, singles)
	}
	settle(t, tr, Done, 4)
	if up, _ := tr.Flush(false); up != 4 {
		t.Fatalf("after tag 4: Flush = %d, want 4", up)
	}
	if tr.Outstanding() != 0 {
		t.Fatalf("outstanding %d, want 0", tr.Outstanding())
	}
}

func BenchmarkTrackSettleFlush(b *testing.B) {
	tr := NewTracker(1024)
	b.ReportAllocs()
	for i := 0; i < b.N; i++ {
		tag := uint64(i + 1)
		_ = tr.Track(tag, 0)
		_ = tr.Settle(tag, Done)
		if tag%64 == 0 {
			tr.Flush(false)
		}
	}
}
