package stack

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"strings"
)

// Event is one EventSource message.
type Event struct {
	ID, Type, Data string
}

// ReadEventSource subscribes to url as a browser's EventSource does and
// calls onEvent for each message until the stream ends or ctx is done.
// lastID, if set, resumes after that id. onOpen runs once the stream is
// open (Nchan has registered the subscriber).
func ReadEventSource(ctx context.Context, url, lastID string, onOpen func(), onEvent func(Event)) error {
	req, err := http.NewRequestWithContext(ctx, "GET", url, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "text/event-stream") // Nchan answers 403 without it
	if lastID != "" {
		req.Header.Set("Last-Event-Id", lastID)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		return fmt.Errorf("eventsource %s: status %d", url, resp.StatusCode)
	}
	if onOpen != nil {
		onOpen()
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	var ev Event
	var data []string
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if data != nil && ev.Type != "ping" {
				ev.Data = strings.Join(data, "\n")
				onEvent(ev)
			}
			ev, data = Event{}, nil
		case strings.HasPrefix(line, "id: "):
			ev.ID = line[4:]
		case strings.HasPrefix(line, "event: "):
			ev.Type = line[7:]
		case strings.HasPrefix(line, "data: "):
			data = append(data, line[6:])
		case line == "data:":
			data = append(data, "")
		}
	}
	if ctx.Err() != nil {
		return ctx.Err()
	}
	return fmt.Errorf("eventsource %s: stream ended: %v", url, sc.Err())
}
