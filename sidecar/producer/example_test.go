package producer_test

import (
	"context"
	"errors"
	"log"

	"github.com/pushrelay/pushrelay/sidecar/producer"
)

// The README's Go usage; compiled by go test so that it cannot rot.
func ExamplePublisher() {
	ctx := context.Background()
	p, err := producer.Dial("amqp://guest:guest@127.0.0.1:5672/", "pushrelay", 1024)
	if err != nil {
		log.Fatal(err)
	}
	defer p.Close()

	err = p.Publish(ctx, producer.Message{
		Channel:     "thread:42",
		Body:        []byte(`{"text":"hello"}`),
		Type:        "comment",
		ID:          "c-17",
		ContentType: "application/json",
	})
	if errors.Is(err, producer.ErrInvalid) {
		log.Print("the message breaks the contract; retrying cannot help: ", err)
	} else if err != nil {
		log.Print("not confirmed; retry: ", err)
	}
}
