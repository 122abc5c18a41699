package relay

import "time"

// rateLimiter lets one log line per key through per interval and counts
// the rest, so a flood of poison messages or a long outage does not flood
// the journal. It belongs to the relay loop and is not safe for
// concurrent use.
type rateLimiter struct {
	every time.Duration
	last  map[string]time.Time
	quiet map[string]int
}

func newRateLimiter(every time.Duration) *rateLimiter {
	return &rateLimiter{every: every, last: map[string]time.Time{}, quiet: map[string]int{}}
}

// allow reports whether a line for key may be logged now.
func (l *rateLimiter) allow(key string) bool {
	now := time.Now()
	if now.Sub(l.last[key]) < l.every {
		l.quiet[key]++
		return false
	}
	l.last[key] = now
	return true
}

// suppressed returns and resets how many lines for key were held back.
func (l *rateLimiter) suppressed(key string) int {
	n := l.quiet[key]
	l.quiet[key] = 0
	return n
}
