package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
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
		return map[string]any{"upstream": upstreamOf(c), "ignored": c.ignored, "stream": c.stream,
			"include_usage": c.includeUsage, "json_mode": c.jsonMode}
	case "responses":
		c, err := parseResponses(gc.Request)
		if err != nil {
			return errorView(err)
		}
		return map[string]any{"upstream": upstreamOf(c), "ignored": c.ignored, "stream": c.stream,
			"previous_response_id": c.previousID}
	case "messages":
		c, err := parseMessages(gc.Request, claudeModels{"opus": "gpt-6.1-sol", "sonnet": "gpt-6-sol", "haiku": "gpt-6-luna"})
		if err != nil {
			return errorView(err)
		}
		return map[string]any{"upstream": upstreamOf(c), "ignored": c.ignored, "stream": c.stream, "client_model": c.clientModel}
	case "anthropic":
		events := []json.RawMessage{}
		s := &anthropicStream{id: "msg_test", model: "claude-test", emit: func(name string, data []byte) {
			events = append(events, json.RawMessage(fmt.Sprintf(`{"event":%q,"data":%s}`, name, data)))
		}}
		tr := &turn{}
		var e event
		for _, ev := range gc.Events {
			e.decode(nil, ev)
			tr.add(&e, s.piece)
		}
		if tr.err != nil {
			return map[string]any{"events": events, "error": errorView(tr.err), "error_event": json.RawMessage(errorBodyOf(tr.err))}
		}
		s.finish(tr)
		return map[string]any{"events": events, "message": json.RawMessage(anthropicMessage(tr, "msg_test", "claude-test"))}
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
			out["response"] = json.RawMessage(responseObject(tr, nil))
		}
		return out
	}
	t.Fatalf("unknown kind %q", gc.Kind)
	return nil
}

// upstreamOf is the upstream body a call gives when the instructions pass as the client sent
// them (--instructions none).
func upstreamOf(c *call) json.RawMessage {
	return buildRequest(c, c.input, nil, prompt{key: c.instructions}, "").body
}

// runStream feeds the events to a turn and a chat stream and collects the chunks, as a
// streamed chat turn does.
func runStream(gc *goldenCase) ([]json.RawMessage, error) {
	chunks := []json.RawMessage{}
	s := newChatStream(testID, testCreated, testModel, gc.Mode, gc.JSONMode, func(c []byte) {
		chunks = append(chunks, bytes.Clone(c))
	})
	var t turn
	var e event
	for _, ev := range gc.Events {
		e.decode(nil, ev)
		if t.add(&e, s.piece); t.err != nil {
			return chunks, t.err
		}
		if t.done {
			s.finish(&t, gc.IncludeUsage)
			break
		}
	}
	return chunks, nil
}

// runTurn feeds the events to a turn.
func runTurn(events []json.RawMessage) *turn {
	tr := &turn{}
	var e event
	for _, ev := range events {
		e.decode(nil, ev)
		tr.add(&e, func(*piece) {})
	}
	return tr
}

// errorBodyOf is the Anthropic error body of err.
func errorBodyOf(err error) []byte {
	_, b := errorEvent(apiMessages, err)
	return b
}

// errorView shows an error in golden files as the client sees it.
func errorView(err error) map[string]any {
	e := show(err)
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

// TestParseErrors checks that every client mistake is a 400 naming the parameter.
func TestParseErrors(t *testing.T) {
	tests := []struct {
		name, kind, body, param string
	}{
		{"bad json", "chat", `{"model":`, ""},
		{"not an object", "chat", `[1]`, ""},
		{"null body", "chat", `null`, ""},
		{"missing model", "chat", `{"messages":[{"role":"user","content":"hi"}]}`, "model"},
		{"empty model", "chat", `{"model":"","messages":[{"role":"user","content":"hi"}]}`, "model"},
		{"model not a string", "chat", `{"model":5,"messages":[{"role":"user","content":"hi"}]}`, "model"},
		{"missing messages", "chat", `{"model":"gpt-5"}`, "messages"},
		{"empty messages", "chat", `{"model":"gpt-5","messages":[]}`, "messages"},
		{"messages not an array", "chat", `{"model":"gpt-5","messages":"hi"}`, "messages"},
		{"message not an object", "chat", `{"model":"gpt-5","messages":["hi"]}`, "messages[0]"},
		{"role wrong type", "chat", `{"model":"gpt-5","messages":[{"role":1}]}`, "messages[0].role"},
		{"role missing", "chat", `{"model":"gpt-5","messages":[{"content":"hi"}]}`, "messages[0].role"},
		{"role unknown", "chat", `{"model":"gpt-5","messages":[{"role":"function","content":"hi"}]}`, "messages[0].role"},
		{"content wrong type", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":5}]}`, "messages[0].content"},
		{"part type unknown", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":[{"type":"input_audio"}]}]}`, "messages[0].content[0].type"},
		{"image in system", "chat", `{"model":"gpt-5","messages":[{"role":"system","content":[{"type":"image_url","image_url":"x"}]}]}`, "messages[0].content[0].type"},
		{"image without url", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}`, "messages[0].content[0].image_url"},
		{"tool without id", "chat", `{"model":"gpt-5","messages":[{"role":"tool","content":"x"}]}`, "messages[0].tool_call_id"},
		{"tool call without name", "chat", `{"model":"gpt-5","messages":[{"role":"assistant","tool_calls":[{"id":"c"}]}]}`, "messages[0].tool_calls[0]"},
		{"n is 2", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"n":2}`, "n"},
		{"n is 0", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"n":0}`, "n"},
		{"n not a number", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"n":"2"}`, "n"},
		{"stream not a bool", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"stream":"yes"}`, "stream"},
		{"include_usage not a bool", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":1}}`, "stream_options.include_usage"},
		{"tools not an array", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"tools":{}}`, "tools"},
		{"tool type", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"web_search"}]}`, "tools[0].type"},
		{"tool name", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"tools":[{"type":"function","function":{}}]}`, "tools[0].function.name"},
		{"tool_choice type", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"tool_choice":3}`, "tool_choice"},
		{"parallel_tool_calls type", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"parallel_tool_calls":"no"}`, "parallel_tool_calls"},
		{"response_format type", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"xml"}}`, "response_format.type"},
		{"json_schema without schema", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"response_format":{"type":"json_schema","json_schema":{"name":"x"}}}`, "response_format.json_schema.schema"},
		{"reasoning_effort type", "chat", `{"model":"gpt-5","messages":[{"role":"user","content":"hi"}],"reasoning_effort":1}`, "reasoning_effort"},
		{"responses bad json", "responses", `{`, ""},
		{"responses missing model", "responses", `{"input":"hi"}`, "model"},
		{"responses missing input", "responses", `{"model":"gpt-5"}`, "input"},
		{"responses empty input", "responses", `{"model":"gpt-5","input":""}`, "input"},
		{"responses empty items", "responses", `{"model":"gpt-5","input":[]}`, "input"},
		{"responses input wrong type", "responses", `{"model":"gpt-5","input":5}`, "input"},
		{"responses item not an object", "responses", `{"model":"gpt-5","input":["hi"]}`, "input[0]"},
		{"responses tools type", "responses", `{"model":"gpt-5","input":"hi","tools":{}}`, "tools"},
		{"responses include type", "responses", `{"model":"gpt-5","input":"hi","include":"x"}`, "include"},
		{"responses reasoning type", "responses", `{"model":"gpt-5","input":"hi","reasoning":"high"}`, "reasoning"},
		{"responses text type", "responses", `{"model":"gpt-5","input":"hi","text":[]}`, "text"},
		{"responses tool_choice type", "responses", `{"model":"gpt-5","input":"hi","tool_choice":1}`, "tool_choice"},
		{"responses stream type", "responses", `{"model":"gpt-5","input":"hi","stream":1}`, "stream"},
		{"responses previous_response_id type", "responses", `{"model":"gpt-5","input":"hi","previous_response_id":1}`, "previous_response_id"},
		{"responses instructions type", "responses", `{"model":"gpt-5","input":"hi","instructions":[]}`, "instructions"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var err error
			if tc.kind == "chat" {
				_, err = parseChat([]byte(tc.body))
			} else {
				_, err = parseResponses([]byte(tc.body))
			}
			if err == nil {
				t.Fatalf("parse %s(%s) succeeded; want an error", tc.kind, tc.body)
			}
			ae := show(err)
			if ae.status != 400 || ae.typ != "invalid_request_error" || ae.param != tc.param || ae.message == "" {
				t.Errorf("parse %s(%s) = %d %s param %q %q; want 400 invalid_request_error param %q",
					tc.kind, tc.body, ae.status, ae.typ, ae.param, ae.message, tc.param)
			}
		})
	}
}

// TestSplitEffort covers the suffix forms and the model names that only look like suffixes.
func TestSplitEffort(t *testing.T) {
	tests := []struct{ in, base, effort string }{
		{"gpt-5", "gpt-5", ""},
		{"gpt-5-high", "gpt-5", "high"},
		{"gpt-5-minimal", "gpt-5", "minimal"},
		{"gpt-5.1-none", "gpt-5.1", "none"},
		{"gpt-5.2-xhigh", "gpt-5.2", "xhigh"},
		{"gpt-5.1-codex:low", "gpt-5.1-codex", "low"},
		{"gpt-5.6-sol:max", "gpt-5.6-sol", "max"},
		{"gpt-5.6-terra:ultra", "gpt-5.6-terra", "ultra"},
		{"gpt-5.1-codex-max", "gpt-5.1-codex-max", ""},
		{"gpt-5.1-codex-mini", "gpt-5.1-codex-mini", ""},
		{"gpt-5.1-codex-max-high", "gpt-5.1-codex-max", "high"},
		{"gpt-5.1-codex-mini:medium", "gpt-5.1-codex-mini", "medium"},
		{"gpt-5.6-sol-ultra", "gpt-5.6-sol-ultra", ""},
		{"gpt-5:fast", "gpt-5:fast", ""},
		{"-high", "-high", ""},
		{":low", ":low", ""},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			if base, effort := splitEffort(tc.in); base != tc.base || effort != tc.effort {
				t.Errorf("splitEffort(%q) = %q, %q; want %q, %q", tc.in, base, effort, tc.base, tc.effort)
			}
		})
	}
}

// TestFailureError checks the status mapping and that the upstream message is kept verbatim.
func TestFailureError(t *testing.T) {
	tests := []struct {
		code   string
		status int
		typ    string
	}{
		{"context_length_exceeded", 400, "invalid_request_error"},
		{"rate_limit_exceeded", 429, "rate_limit_error"},
		{"insufficient_quota", 429, "rate_limit_error"},
		{"usage_not_included", 429, "rate_limit_error"},
		{"usage_limit_reached", 429, "rate_limit_error"},
		{"server_error", 502, "api_error"},
		{"", 502, "api_error"},
	}
	for _, tc := range tests {
		t.Run(tc.code, func(t *testing.T) {
			e := show(failureError(tc.code, "Upstream said: <exactly> this."))
			if e.status != tc.status || e.typ != tc.typ || e.code != tc.code || e.message != "Upstream said: <exactly> this." {
				t.Errorf("failureError(%q) = %+v; want status %d type %s, message verbatim", tc.code, e, tc.status, tc.typ)
			}
		})
	}
	if e := failureError("boom", ""); e.Error() == "" {
		t.Errorf("failureError(boom, \"\") has an empty message")
	}
}

// trickyStrings exercise the JSON escaper and unescaper.
var trickyStrings = []string{
	"", "plain", `quote " backslash \ slash /`, "\b\f\n\r\t", "\x00\x01\x1f\x7f",
	"line\u2028sep\u2029para", "<script>&amp;</script>", "émoji 😀 中文",
	"bad utf8 \xff\xfe end", "truncated \xe2\x82", "surrogate-ish \xed\xa0\x80",
}

// TestAppendEscaped compares the hand-written escaper with encoding/json, byte for byte.
func TestAppendEscaped(t *testing.T) {
	for _, s := range trickyStrings {
		var want bytes.Buffer
		enc := json.NewEncoder(&want)
		enc.SetEscapeHTML(false)
		if err := enc.Encode(s); err != nil {
			t.Fatal(err)
		}
		got := append(appendEscaped([]byte{'"'}, s), '"')
		if !bytes.Equal(got, bytes.TrimSuffix(want.Bytes(), []byte("\n"))) {
			t.Errorf("appendEscaped(%q) = %s; want %s", s, got, want.Bytes())
		}
	}
}

// TestScanDelta compares the fast delta path of event.decode with encoding/json on escaped and
// odd shapes.
func TestScanDelta(t *testing.T) {
	events := []string{
		`{"type":"response.output_text.delta","item_id":"msg_1","output_index":0,"content_index":0,"delta":"Hel"}`,
		`{"delta":"a\"b\\c\/d\b\f\n\r\t\u0001\u00e9\u2028\ud83d\ude00","item_id":"m"}`,
		`{"delta":"lone \ud800 high, lone \udc00 low, pair split \ud83d x","item_id":"m"}`,
		` { "item_id" : "msg_2" , "logprobs" : [ {"a":[1,{"b":"}"}]} ] , "obfuscation":"x\"}", "n": -1.5e3, "ok": true, "z": null, "delta" : "sp aced" } `,
		`{"item_id":"rs_1","summary_index":3,"delta":"part"}`,
		`{"item_id":"rs_1","content_index":2,"delta":"raw"}`,
		`{"item_id":"m","delta":""}`,
		`{"item_id":"m","delta":"x","delta":"last wins"}`,
		`{"item_\u0069d":"m","delta":"escaped key"}`,
		`{"item_id":"m","delta":"bad escape \x"}`,
		`{"item_id":"m","delta":5}`,
		`{"item_id":"m","delta":"unterminated}`,
		`not json`,
	}
	for _, ev := range events {
		t.Run(ev, func(t *testing.T) {
			var want struct {
				ItemID       string  `json:"item_id"`
				Delta        *string `json:"delta"`
				SummaryIndex int     `json:"summary_index"`
				ContentIndex int     `json:"content_index"`
			}
			wantOK := json.Unmarshal([]byte(ev), &want) == nil && want.Delta != nil
			var got event
			got.decode([]byte("response.output_text.delta"), []byte(ev))
			if !wantOK {
				return // nothing to compare: encoding/json finds no delta either
			}
			idx := got.SummaryIndex + got.ContentIndex
			if got.ItemID != want.ItemID || got.Delta != *want.Delta || idx != want.SummaryIndex+want.ContentIndex {
				t.Errorf("decode = %q, %q, %d; want %q, %q, %d", got.ItemID, got.Delta, idx, want.ItemID, *want.Delta, want.SummaryIndex+want.ContentIndex)
			}
		})
	}
}

// TestStreamMatchesCompletion replays every golden event case and checks that the chunks,
// put together, say what the non-streaming completion says.
func TestStreamMatchesCompletion(t *testing.T) {
	inputs, _ := filepath.Glob("testdata/translate/events_*.input.json")
	for _, in := range inputs {
		t.Run(filepath.Base(in), func(t *testing.T) {
			src, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			var gc goldenCase
			if err := json.Unmarshal(src, &gc); err != nil {
				t.Fatal(err)
			}
			chunks, err := runStream(&gc)
			tr := runTurn(gc.Events)
			if err != nil || tr.err != nil {
				if !reflect.DeepEqual(err, error(tr.err)) {
					t.Errorf("stream error %v; turn error %v; want the same", err, tr.err)
				}
				return
			}
			var content, reasoning, finish strings.Builder
			var calls []map[string]string
			roles := 0
			for i, c := range chunks {
				var ch struct {
					Object  string `json:"object"`
					Choices []struct {
						Delta struct {
							Role             *string
							Content          *string
							ReasoningContent string `json:"reasoning_content"`
							ToolCalls        []struct {
								Index    int
								ID       string
								Function struct{ Name, Arguments string }
							} `json:"tool_calls"`
						}
						FinishReason *string `json:"finish_reason"`
					}
				}
				if err := json.Unmarshal(c, &ch); err != nil || ch.Object != "chat.completion.chunk" {
					t.Fatalf("chunk %d %s: %v", i, c, err)
				}
				if len(ch.Choices) == 0 {
					continue // the usage chunk
				}
				d := ch.Choices[0].Delta
				if d.Role != nil {
					roles++
					if i != 0 {
						t.Errorf("role delta in chunk %d; want it first", i)
					}
				} else if d.Content != nil {
					content.WriteString(*d.Content)
				}
				reasoning.WriteString(d.ReasoningContent)
				for _, tc := range d.ToolCalls {
					if tc.Index == len(calls) {
						calls = append(calls, map[string]string{"id": tc.ID, "name": tc.Function.Name})
					}
					calls[tc.Index]["arguments"] += tc.Function.Arguments
				}
				if fr := ch.Choices[0].FinishReason; fr != nil {
					finish.WriteString(*fr + ";")
				}
			}
			var cc struct {
				Choices []struct {
					Message struct {
						Content          *string
						ReasoningContent string `json:"reasoning_content"`
						ToolCalls        []struct {
							ID       string
							Function struct{ Name, Arguments string }
						} `json:"tool_calls"`
					}
					FinishReason string `json:"finish_reason"`
				}
			}
			if err := json.Unmarshal(chatCompletion(tr, testID, testCreated, testModel, gc.Mode, gc.JSONMode), &cc); err != nil {
				t.Fatal(err)
			}
			m := cc.Choices[0].Message
			if roles != 1 || finish.String() != cc.Choices[0].FinishReason+";" {
				t.Errorf("stream has %d role chunks and finish reasons %q; want 1 and %q", roles, finish.String(), cc.Choices[0].FinishReason)
			}
			if got, want := content.String(), strings.TrimPrefix(deref(m.Content), "<reasoning>"+m.ReasoningContent+"</reasoning>\n\n"); !strings.HasSuffix(got, want) {
				t.Errorf("streamed content %q; want it to end with the completion's answer %q", got, want)
			}
			if reasoning.String() != m.ReasoningContent {
				t.Errorf("streamed reasoning %q; want %q", reasoning.String(), m.ReasoningContent)
			}
			if len(calls) != len(m.ToolCalls) {
				t.Fatalf("streamed %d tool calls; want %d", len(calls), len(m.ToolCalls))
			}
			for i, c := range m.ToolCalls {
				if calls[i]["id"] != c.ID || calls[i]["name"] != c.Function.Name || calls[i]["arguments"] != c.Function.Arguments {
					t.Errorf("streamed call %d = %v; want %+v", i, calls[i], c)
				}
			}
		})
	}
}

// deref returns *p or "".
func deref(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// TestNormalizeIdempotent checks that normalizing twice changes nothing, and that a
// normalized request parses to itself.
func TestNormalizeIdempotent(t *testing.T) {
	items := []string{
		`{"type":"message","id":"msg_1","role":"system","content":[{"type":"input_text","text":"<b>&</b>"}]}`,
		`{"role":"user","content":"hi"}`,
		`{"type":"reasoning","id":"rs_1","summary":[],"encrypted_content":"gAAA"}`,
	}
	for _, it := range items {
		o, err := new(call).normalizeItem(json.RawMessage(it), "input[0]")
		if err != nil {
			t.Fatal(err)
		}
		once := marshal(o)
		o, _ = new(call).normalizeItem(once, "input[0]")
		twice := marshal(o)
		if !bytes.Equal(once, twice) {
			t.Errorf("normalizeItem(normalizeItem(%s)) = %s; want %s", it, twice, once)
		}
		if bytes.Contains(once, []byte(`"id"`)) || bytes.Contains(once, []byte(`"system"`)) {
			t.Errorf("normalizeItem(%s) = %s; want no id and no system role", it, once)
		}
	}
	src, err := os.ReadFile("testdata/translate/responses_normalize.input.json")
	if err != nil {
		t.Fatal(err)
	}
	var gc goldenCase
	if err := json.Unmarshal(src, &gc); err != nil {
		t.Fatal(err)
	}
	first, err := parseResponses(gc.Request)
	if err != nil {
		t.Fatal(err)
	}
	again, err := parseResponses(upstreamOf(first))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(upstreamOf(again), upstreamOf(first)) || len(again.ignored) != 0 {
		t.Errorf("parseResponses of its own output = %s (ignored %v); want %s", upstreamOf(again), again.ignored, upstreamOf(first))
	}
}

// TestTurnOrder checks that output items are kept in output_index order whatever their
// arrival order, and that responseObject works without a response.completed.
func TestTurnOrder(t *testing.T) {
	tr := &turn{}
	for _, ev := range []string{
		`{"type":"response.output_item.done","output_index":2,"item":{"type":"message","content":[{"type":"output_text","text":"c"}]}}`,
		`{"type":"response.output_item.done","output_index":0,"item":{"type":"message","content":[{"type":"output_text","text":"a"}]}}`,
		`{"type":"response.output_text.delta","delta":"ignored"}`,
		`{"type":"response.output_item.done","output_index":1,"item":{"type":"message","content":[{"type":"output_text","text":"b"}]}}`,
	} {
		var e event
		e.decode(nil, []byte(ev))
		tr.add(&e, func(*piece) {})
	}
	var obj struct {
		Object     string `json:"object"`
		OutputText string `json:"output_text"`
	}
	if err := json.Unmarshal(responseObject(tr, nil), &obj); err != nil || obj.OutputText != "abc" || obj.Object != "response" || tr.done {
		t.Errorf("responseObject() = %+v, %v (done %v); want object response, output_text abc", obj, err, tr.done)
	}
}

// BenchmarkChatDelta measures the hot path: one response.output_text.delta, decoded, taken in
// by the turn and written as one chunk.
func BenchmarkChatDelta(b *testing.B) {
	ev := []byte(`{"type":"response.output_text.delta","sequence_number":42,"item_id":"msg_68a1b2c3d4e5f6","output_index":1,"content_index":0,"delta":" the quick brown fox \"jumps\"\n","logprobs":[],"obfuscation":"k3Jd9s"}`)
	name := []byte("response.output_text.delta")
	n := 0
	s := newChatStream("chatcmpl-0123456789abcdef", 1763900000, "gpt-5.1-codex", reasoningTags, false,
		func(c []byte) { n += len(c) })
	var t turn
	var e event
	e.decode(name, ev)
	t.add(&e, s.piece) // the role chunk out of the way
	b.ReportAllocs()
	for b.Loop() {
		e.decode(name, ev)
		t.add(&e, s.piece)
	}
}

// goldenSeeds adds the golden inputs of one kind to a fuzz corpus.
func goldenSeeds(f *testing.F, kind string, add func(gc goldenCase)) {
	paths, _ := filepath.Glob(filepath.Join("testdata", "translate", "*.input.json"))
	for _, p := range paths {
		var gc goldenCase
		b, err := os.ReadFile(p)
		if err == nil && json.Unmarshal(b, &gc) == nil && gc.Kind == kind {
			add(gc)
		}
	}
}

// FuzzParseRequests: whatever a client sends, a request the translator
// accepts must pass the backend's own rules (as the fake backend of handlers_test.go enforces them), and a refusal is a 400.
func FuzzParseRequests(f *testing.F) {
	goldenSeeds(f, "chat", func(gc goldenCase) { f.Add(true, []byte(gc.Request)) })
	goldenSeeds(f, "responses", func(gc goldenCase) { f.Add(false, []byte(gc.Request)) })
	f.Fuzz(func(t *testing.T, chat bool, body []byte) {
		parse := parseResponses
		if chat {
			parse = parseChat
		}
		c, err := parse(body)
		if err != nil {
			if show(err).status != 400 {
				t.Fatalf("refusal %v is not a 400", err)
			}
			return
		}
		if slices.ContainsFunc(c.input, func(it json.RawMessage) bool { return bytes.Contains(it, []byte(`"item_reference"`)) }) {
			return // the session store expands references, or answers 404
		}
		// Any model name is the backend's business: the request must pass its rules for a
		// classic model and for a Lite one, unless check refuses it first with a 400.
		for _, model := range []string{"gpt-5.5", "gpt-6-sol"} {
			m := fixtureModels[model]
			c.model = model
			if err := check(c, &m); err != nil {
				if show(err).status != 400 {
					t.Fatalf("check refused %s with %v; want a 400", model, err)
				}
				continue
			}
			req := buildRequest(c, c.input, &m, prompt{key: c.instructions}, "")
			var up map[string]any
			if err := json.Unmarshal(req.body, &up); err != nil {
				t.Fatalf("translated request is not JSON: %v", err)
			}
			if msg := backendRejects(up, req.header); msg != "" {
				t.Fatalf("the backend would refuse the translation of\n%s\nfor %s with %s\n(sent %s)", body, model, msg, req.body)
			}
		}
	})
}

// FuzzBackendEvents: whatever the backend streams, the chat chunks, the
// chat completion and the Responses object are valid JSON and nothing panics.
func FuzzBackendEvents(f *testing.F) {
	goldenSeeds(f, "events", func(gc goldenCase) {
		var b []byte
		for _, ev := range gc.Events {
			b = append(append(b, ev...), '\n')
		}
		f.Add(b, gc.Mode == reasoningTags, gc.JSONMode)
	})
	f.Fuzz(func(t *testing.T, stream []byte, tags, jsonMode bool) {
		mode := reasoningField
		if tags {
			mode = reasoningTags
		}
		cs := newChatStream(testID, testCreated, testModel, mode, jsonMode, func(chunk []byte) {
			if !json.Valid(chunk) {
				t.Fatalf("chunk is not JSON: %s", chunk)
			}
		})
		var tr turn
		var e event
		for _, data := range bytes.Split(stream, []byte("\n")) {
			e.decode(nil, data)
			tr.add(&e, cs.piece)
		}
		cs.finish(&tr, true)
		if out := chatCompletion(&tr, testID, testCreated, testModel, mode, jsonMode); !json.Valid(out) {
			t.Fatalf("chat completion is not JSON: %s", out)
		}
		if tr.done {
			if out := responseObject(&tr, nil); !json.Valid(out) {
				t.Fatalf("response object is not JSON: %s", out)
			}
		}
	})
}
