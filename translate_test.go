package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite golden files")

// goldenCase is a testdata/translate/<case>.input.json file.
type goldenCase struct {
	Kind         string            `json:"kind"` // chat, responses or events
	Request      json.RawMessage   `json:"request"`
	Mode         reasoningMode     `json:"mode"`
	JSONMode     bool              `json:"json_mode"`
	IncludeUsage bool              `json:"include_usage"`
	Events       []json.RawMessage `json:"events"`
}

// Fixed stream identity: translate.go takes ids and clocks as parameters.
const (
	testID      = "chatcmpl-test"
	testCreated = 1700000000
	testModel   = "gpt-5.1-codex"
)

// TestTranslate runs every golden case; go test -run TestTranslate -update rewrites them.
func TestTranslate(t *testing.T) {
	inputs, err := filepath.Glob("testdata/translate/*.input.json")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no golden inputs: %v", err)
	}
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".input.json")
		t.Run(name, func(t *testing.T) {
			src, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			var gc goldenCase
			if err := json.Unmarshal(src, &gc); err != nil {
				t.Fatalf("%s: %v", in, err)
			}
			got := indent(t, translateCase(t, &gc))
			golden := strings.TrimSuffix(in, ".input.json") + ".golden.json"
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test -run TestTranslate -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("translation of %s differs from %s:\n got: %s\nwant: %s", in, golden, got, want)
			}
		})
	}
}

// translateCase produces the golden output of one case.
func translateCase(t *testing.T, gc *goldenCase) any {
	t.Helper()
	switch gc.Kind {
	case "chat":
		c, err := parseChat(gc.Request)
		if err != nil {
			return errorView(err)
		}
		return map[string]any{"upstream": c.req, "ignored": c.ignored, "stream": c.stream,
			"include_usage": c.includeUsage, "json_mode": c.jsonMode}
	case "responses":
		c, err := parseResponses(gc.Request)
		if err != nil {
			return errorView(err)
		}
		return map[string]any{"upstream": c.req, "ignored": c.ignored, "stream": c.stream,
			"previous_response_id": c.previousResponseID}
	case "events":
		chunks, streamErr := runStream(gc)
		tr := runTurn(gc.Events)
		out := map[string]any{"chunks": chunks}
		if streamErr != nil {
			out["stream_error"] = errorView(streamErr)
		}
		if tr.err != nil {
			out["turn_error"] = errorView(tr.err)
		} else {
			out["completion"] = json.RawMessage(chatCompletion(tr, testID, testCreated, testModel, gc.Mode, gc.JSONMode))
			out["response"] = json.RawMessage(tr.responseObject())
		}
		return out
	}
	t.Fatalf("unknown kind %q", gc.Kind)
	return nil
}

// eventType returns the "type" of an event, which the backend repeats as the SSE event name.
func eventType(ev []byte) string {
	var e struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal(ev, &e)
	return e.Type
}

// runStream feeds the events to a chatStream and collects the chunks (copied: emit's slice is reused).
func runStream(gc *goldenCase) ([]json.RawMessage, error) {
	s := newChatStream(testID, testCreated, testModel, gc.Mode, gc.JSONMode, gc.IncludeUsage)
	chunks := []json.RawMessage{}
	for _, ev := range gc.Events {
		err := s.event(eventType(ev), ev, func(c []byte) error {
			chunks = append(chunks, bytes.Clone(c))
			return nil
		})
		if err != nil {
			return chunks, err
		}
	}
	return chunks, nil
}

// runTurn feeds the events to a turn.
func runTurn(events []json.RawMessage) *turn {
	tr := &turn{}
	for _, ev := range events {
		tr.observe(eventType(ev), ev)
	}
	return tr
}

// errorView shows an *apiError in golden files.
func errorView(err error) map[string]any {
	e, ok := err.(*apiError)
	if !ok {
		return map[string]any{"not_api_error": err.Error()}
	}
	return map[string]any{"status": e.status, "type": e.typ, "code": e.code, "param": e.param, "message": e.message}
}

// indent renders v as indented JSON, failing on any invalid chunk.
func indent(t *testing.T, v any) []byte {
	t.Helper()
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "  ")
	if err := enc.Encode(v); err != nil {
		t.Fatalf("encode golden output: %v", err)
	}
	return b.Bytes()
}
