package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"
)

// reasoningMode is how reasoning summaries appear in chat completions (--reasoning).
type reasoningMode string

// The --reasoning values (SPEC §2).
const (
	reasoningTags  reasoningMode = "tags"
	reasoningField reasoningMode = "field"
	reasoningNone  reasoningMode = "none"
)

// upstreamRequest is the body of POST {upstream}/responses.
type upstreamRequest struct {
	Model             string            `json:"model"`
	Instructions      *string           `json:"instructions,omitempty"`
	Input             []json.RawMessage `json:"input"`
	Tools             []json.RawMessage `json:"tools"` // never nil: Codex always sends []
	ToolChoice        json.RawMessage   `json:"tool_choice,omitempty"`
	ParallelToolCalls *bool             `json:"parallel_tool_calls,omitempty"`
	Reasoning         json.RawMessage   `json:"reasoning,omitempty"`
	Store             bool              `json:"store"`  // always false: the backend 400s otherwise (codex-backend §3.4)
	Stream            bool              `json:"stream"` // always true: the backend only streams (§3.4)
	Include           []string          `json:"include,omitempty"`
	PromptCacheKey    string            `json:"prompt_cache_key,omitempty"` // set later by the handler (session id)
	Text              json.RawMessage   `json:"text,omitempty"`
	ClientMetadata    json.RawMessage   `json:"client_metadata,omitempty"`
}

// chatCall is a Chat Completions request translated for the backend.
type chatCall struct {
	req          upstreamRequest
	ignored      []string // top-level parameters not sent upstream, sorted (for the X-Ccproxy-Ignored-Params header)
	stream       bool
	includeUsage bool // stream_options.include_usage
	jsonMode     bool // response_format asks for JSON: never reasoning tags
}

// responsesCall is a native Responses request normalized for the backend.
type responsesCall struct {
	req                upstreamRequest
	ignored            []string
	stream             bool
	previousResponseID string // emulated by the session layer; never sent upstream
	chatBody           bool   // "messages" and no "input": a chat request (SPEC §5.2); nothing else is set
}

// encryptedReasoning is the include value that makes the backend return reasoning items it
// can read back with store=false; sessions replay them (codex-backend §4 (b)).
const encryptedReasoning = "reasoning.encrypted_content"

// object is a JSON object decoded one level deep.
type object map[string]json.RawMessage

// chatParams are the Chat Completions parameters parseChat translates (n is only checked).
var chatParams = []string{"model", "messages", "stream", "stream_options", "tools", "tool_choice",
	"parallel_tool_calls", "response_format", "reasoning_effort", "verbosity"}

// responsesParams are the Responses parameters parseResponses keeps or consumes.
var responsesParams = []string{"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
	"reasoning", "text", "include", "prompt_cache_key", "client_metadata", "stream", "previous_response_id"}

// decodeBody decodes a request body, which must be a JSON object, into v. It returns the
// non-null members outside known, sorted: they are not sent upstream, so nothing unknown
// reaches a backend that 400s on "Unsupported parameter" (codex-backend §3.4), but the client
// is told. store:false is not listed: it is exactly what upstream gets anyway.
func decodeBody(body []byte, known []string, v any) ([]string, error) {
	var o object
	if json.Unmarshal(body, &o) != nil || o == nil {
		// OpenAI answers a body it cannot parse with param null; there is no parameter to name.
		return nil, invalidRequest("", "We could not parse the JSON body of your request: expected a JSON object.")
	}
	var ignored []string
	for k, raw := range o {
		if !slices.Contains(known, k) && !isNull(raw) && (k != "store" || string(raw) != "false") {
			ignored = append(ignored, k)
		}
	}
	slices.Sort(ignored)
	return ignored, decodeParam(body, "", v)
}

// jsonKinds names the JSON type each Go kind decodes from, for "Invalid type" messages.
var jsonKinds = map[reflect.Kind]string{reflect.String: "a string", reflect.Bool: "a boolean",
	reflect.Int: "an integer", reflect.Slice: "an array", reflect.Struct: "an object"}

// decodeParam unmarshals raw into v. A member of the wrong type is a 400 naming it, param plus the
// path encoding/json reports, the way OpenAI names parameters ("stream_options.include_usage").
func decodeParam(raw []byte, param string, v any) error {
	var te *json.UnmarshalTypeError
	if err := json.Unmarshal(raw, v); errors.As(err, &te) {
		param = strings.Trim(param+"."+te.Field, ".")
		return invalidRequest(param, "Invalid type for '%s': expected %s.", param, cmp.Or(jsonKinds[te.Type.Kind()], te.Type.String()))
	} else if err != nil {
		return invalidRequest(param, "We could not parse the JSON body of your request.")
	}
	return nil
}

// isNull reports whether a member decoded into a RawMessage is absent or null (encoding/json
// hands a RawMessage the value without surrounding space).
func isNull(raw json.RawMessage) bool { return len(raw) == 0 || string(raw) == "null" }

// marshal encodes v without HTML escaping (the bytes go to APIs, not to browsers).
func marshal(v any) json.RawMessage {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	// Only structs, strings, maps and already-valid RawMessages are encoded here: no error is possible.
	_ = enc.Encode(v)
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

// one encodes a single item.
func one(v any) []json.RawMessage { return []json.RawMessage{marshal(v)} }

// baseRequest fills the members the backend insists on (codex-backend §0, §3.3, §3.4) and
// returns the effort a model-name suffix asks for.
func baseRequest(model string) (upstreamRequest, string, error) {
	if model == "" {
		return upstreamRequest{}, "", invalidRequest("model", "Missing required parameter: 'model'.")
	}
	base, effort := splitEffort(model)
	return upstreamRequest{Model: base, Input: []json.RawMessage{}, Tools: []json.RawMessage{},
		Store: false, Stream: true, Include: []string{encryptedReasoning}}, effort, nil
}

// splitEffort removes a reasoning-effort suffix from a model name, as peers accept
// (codex-backend §3.5): "-high" style for the classic efforts, ":" also for 2026's max/ultra.
// "-max" and "-mini" are never suffixes: gpt-5.1-codex-max and gpt-5.1-codex-mini are models.
func splitEffort(model string) (base, effort string) {
	if i := strings.LastIndexByte(model, ':'); i > 0 {
		switch e := model[i+1:]; e {
		case "none", "minimal", "low", "medium", "high", "xhigh", "max", "ultra":
			return model[:i], e
		}
	}
	if i := strings.LastIndexByte(model, '-'); i > 0 {
		switch e := model[i+1:]; e {
		case "none", "minimal", "low", "medium", "high", "xhigh":
			return model[:i], e
		}
	}
	return model, ""
}

// textPart is an input_text or output_text content part.
type textPart struct {
	Type string `json:"type"`
	Text string `json:"text"`
}

// messageItem is a Responses message input item.
type messageItem struct {
	Type    string `json:"type"`
	Role    string `json:"role"`
	Content []any  `json:"content"`
}

// functionDef is the function of a chat tool; with a type next to it, it is a Responses tool.
type functionDef struct {
	Name        string          `json:"name"`
	Description string          `json:"description,omitempty"`
	Parameters  json.RawMessage `json:"parameters"`
	Strict      bool            `json:"strict"`
}

// chatRequest holds the Chat Completions parameters parseChat reads (SPEC §4).
type chatRequest struct {
	Model         string            `json:"model"`
	Messages      []json.RawMessage `json:"messages"`
	N             int               `json:"n"`
	Stream        bool              `json:"stream"`
	StreamOptions struct {
		IncludeUsage bool `json:"include_usage"`
	} `json:"stream_options"`
	Tools []struct {
		Type     string       `json:"type"`
		Function *functionDef `json:"function"`
	} `json:"tools"`
	ToolChoice        json.RawMessage `json:"tool_choice"`
	ParallelToolCalls bool            `json:"parallel_tool_calls"`
	ResponseFormat    struct {
		Type       string `json:"type"`
		JSONSchema struct {
			Name        string          `json:"name"`
			Description string          `json:"description,omitempty"`
			Schema      json.RawMessage `json:"schema"`
			Strict      bool            `json:"strict"`
		} `json:"json_schema"`
	} `json:"response_format"`
	ReasoningEffort string `json:"reasoning_effort"`
	Verbosity       string `json:"verbosity"`
}

// chatMessage is one member of a Chat Completions messages array.
type chatMessage struct {
	Role       string          `json:"role"`
	Content    json.RawMessage `json:"content"`
	ToolCallID string          `json:"tool_call_id"`
	ToolCalls  []struct {
		ID       string `json:"id"`
		Function struct {
			Name      string `json:"name"`
			Arguments string `json:"arguments"`
		} `json:"function"`
	} `json:"tool_calls"`
}

// chatPart is one content part of a chat message.
type chatPart struct {
	Type     string          `json:"type"`
	Text     string          `json:"text"`
	Refusal  string          `json:"refusal"`
	ImageURL json.RawMessage `json:"image_url"`
}

// parseChat translates a Chat Completions body (SPEC §4; peers' choices in codex-backend §7).
func parseChat(body []byte) (chatCall, error) {
	r := chatRequest{N: 1}
	ignored, err := decodeBody(body, chatParams, &r)
	if err != nil {
		return chatCall{}, err
	}
	req, effort, err := baseRequest(r.Model)
	if err != nil {
		return chatCall{}, err
	}
	if r.N != 1 {
		return chatCall{}, invalidRequest("n", "Invalid value for 'n': ccproxy supports only n=1, got %d.", r.N)
	}
	if len(r.Messages) == 0 {
		return chatCall{}, invalidRequest("messages", "Missing required parameter: 'messages'.")
	}
	for i, raw := range r.Messages {
		items, err := chatItems(raw, "messages["+strconv.Itoa(i)+"]")
		if err != nil {
			return chatCall{}, err
		}
		req.Input = append(req.Input, items...)
	}
	// The backend wants flat {type,name,…} tools and 400s on the nested chat shape with
	// "Missing required parameter: 'tools[0].name'" (§3.3).
	for i, t := range r.Tools {
		p := "tools[" + strconv.Itoa(i) + "]"
		if t.Type != "function" {
			return chatCall{}, invalidRequest(p+".type", "Invalid value for '%s.type': only function tools are supported, got %q.", p, t.Type)
		}
		if t.Function == nil || t.Function.Name == "" {
			return chatCall{}, invalidRequest(p+".function.name", "Missing required parameter: '%s.function.name'.", p)
		}
		if isNull(t.Function.Parameters) {
			t.Function.Parameters = json.RawMessage(`{"type":"object","properties":{}}`)
		}
		req.Tools = append(req.Tools, marshal(struct {
			Type string `json:"type"`
			*functionDef
		}{"function", t.Function}))
	}
	if req.ToolChoice, err = chatToolChoice(r.ToolChoice); err != nil {
		return chatCall{}, err
	}
	c := chatCall{ignored: ignored, stream: r.Stream, includeUsage: r.StreamOptions.IncludeUsage && r.Stream}
	if req.Text, c.jsonMode, err = chatText(&r); err != nil {
		return chatCall{}, err
	}
	// Codex sends parallel_tool_calls false unless the model family supports it (§3.3);
	// false is also the chat default here, the conservative one.
	req.ParallelToolCalls = &r.ParallelToolCalls
	// An explicit reasoning_effort beats the model-name suffix; summary "auto" is what Codex sends.
	req.Reasoning = marshal(struct {
		Effort  string `json:"effort,omitempty"`
		Summary string `json:"summary"`
	}{cmp.Or(r.ReasoningEffort, effort), "auto"})
	c.req = req
	return c, nil
}

// chatItems turns one chat message into Responses input items.
func chatItems(raw json.RawMessage, param string) ([]json.RawMessage, error) {
	var m chatMessage
	if err := decodeParam(raw, param, &m); err != nil {
		return nil, err
	}
	// The backend answers role system with "System messages are not allowed" (§3.4);
	// only user messages take images; assistant text is output_text.
	role, textType := m.Role, "input_text"
	switch m.Role {
	case "system":
		role = "developer"
	case "assistant":
		textType = "output_text"
	case "developer", "user":
	case "tool":
		if m.ToolCallID == "" {
			return nil, invalidRequest(param+".tool_call_id", "Missing required parameter: '%s.tool_call_id'.", param)
		}
		parts, err := chatContent(m.Content, param, "input_text", false)
		var out strings.Builder
		for _, p := range parts {
			out.WriteString(p.(textPart).Text)
		}
		return one(struct {
			Type   string `json:"type"`
			CallID string `json:"call_id"`
			Output string `json:"output"`
		}{"function_call_output", m.ToolCallID, out.String()}), err
	case "":
		return nil, invalidRequest(param+".role", "Missing required parameter: '%s.role'.", param)
	default:
		return nil, invalidRequest(param+".role", "Invalid value for '%s.role': %q is not supported.", param, m.Role)
	}
	parts, err := chatContent(m.Content, param, textType, role == "user")
	if err != nil {
		return nil, err
	}
	var items []json.RawMessage
	if len(parts) > 0 { // an empty message (an assistant turn that only called tools) is left out
		items = one(messageItem{"message", role, parts})
	}
	// Calls follow the message, the order the backend produced them in (§7).
	for j, tc := range m.ToolCalls {
		if tc.ID == "" || tc.Function.Name == "" {
			p := param + ".tool_calls[" + strconv.Itoa(j) + "]"
			return nil, invalidRequest(p, "Missing required parameter: '%s.id' or '%s.function.name'.", p, p)
		}
		items = append(items, marshal(struct {
			Type      string `json:"type"`
			Name      string `json:"name"`
			Arguments string `json:"arguments"`
			CallID    string `json:"call_id"`
		}{"function_call", tc.Function.Name, tc.Function.Arguments, tc.ID}))
	}
	return items, nil
}

// chatContent converts message content (a string or an array of parts) to Responses parts of
// textType; images are allowed only where the backend takes them (user messages).
func chatContent(raw json.RawMessage, param, textType string, images bool) ([]any, error) {
	var s string
	if isNull(raw) || json.Unmarshal(raw, &s) == nil {
		if s == "" {
			return nil, nil
		}
		return []any{textPart{textType, s}}, nil
	}
	var parts []chatPart
	if err := json.Unmarshal(raw, &parts); err != nil {
		return nil, invalidRequest(param+".content", "Invalid type for '%s.content': expected a string or an array of content parts.", param)
	}
	var out []any
	for j, p := range parts {
		pp := param + ".content[" + strconv.Itoa(j) + "]"
		switch {
		case p.Type == "text":
			out = append(out, textPart{textType, p.Text})
		case p.Type == "refusal" && textType == "output_text":
			out = append(out, textPart{textType, p.Refusal})
		case p.Type == "image_url" && images:
			var img struct {
				URL    string `json:"url"`
				Detail string `json:"detail"`
			}
			if json.Unmarshal(p.ImageURL, &img.URL) != nil && json.Unmarshal(p.ImageURL, &img) != nil || img.URL == "" {
				return nil, invalidRequest(pp+".image_url", "Invalid value for '%s.image_url': expected a URL string or {\"url\": …}.", pp)
			}
			out = append(out, struct { // the backend wants image_url as a plain string
				Type     string `json:"type"`
				ImageURL string `json:"image_url"`
				Detail   string `json:"detail,omitempty"`
			}{"input_image", img.URL, img.Detail})
		default:
			return nil, invalidRequest(pp+".type", "Invalid value for '%s.type': %q is not supported here.", pp, p.Type)
		}
	}
	return out, nil
}

// chatToolChoice maps tool_choice: strings pass, {type:function,function:{name}} is flattened
// like the tools themselves, other objects pass unchanged; Codex's default is "auto".
func chatToolChoice(raw json.RawMessage) (json.RawMessage, error) {
	var tc struct {
		Type     string `json:"type"`
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	var s string
	switch {
	case isNull(raw):
		return json.RawMessage(`"auto"`), nil
	case json.Unmarshal(raw, &s) == nil:
		return marshal(s), nil
	case json.Unmarshal(raw, &tc) != nil:
		return nil, invalidRequest("tool_choice", "Invalid type for 'tool_choice': expected a string or an object.")
	case tc.Type == "function" && tc.Function.Name != "":
		return marshal(struct {
			Type string `json:"type"`
			Name string `json:"name"`
		}{"function", tc.Function.Name}), nil
	}
	return raw, nil
}

// chatText maps response_format to text.format and verbosity to text.verbosity (§3.3).
func chatText(r *chatRequest) (json.RawMessage, bool, error) {
	text := struct {
		Format    any    `json:"format,omitempty"`
		Verbosity string `json:"verbosity,omitempty"`
	}{Verbosity: r.Verbosity}
	switch js := r.ResponseFormat.JSONSchema; r.ResponseFormat.Type {
	case "", "text":
	case "json_object":
		text.Format = map[string]string{"type": "json_object"}
	case "json_schema":
		if len(js.Schema) == 0 {
			return nil, false, invalidRequest("response_format.json_schema.schema", "Missing required parameter: 'response_format.json_schema.schema'.")
		}
		text.Format = struct {
			Type string          `json:"type"`
			Name string          `json:"name"`
			Desc string          `json:"description,omitempty"`
			Str  bool            `json:"strict"`
			Sch  json.RawMessage `json:"schema"`
		}{"json_schema", cmp.Or(js.Name, "response"), js.Description, js.Strict, js.Schema}
	default:
		return nil, false, invalidRequest("response_format.type", "Invalid value for 'response_format.type': %q is not supported.", r.ResponseFormat.Type)
	}
	if text.Format == nil && text.Verbosity == "" {
		return nil, false, nil
	}
	return marshal(text), text.Format != nil, nil
}

// responsesRequest holds the Responses parameters parseResponses keeps or consumes (SPEC §5.1).
type responsesRequest struct {
	Model              string            `json:"model"`
	Input              json.RawMessage   `json:"input"`
	Instructions       *string           `json:"instructions"`
	Tools              []json.RawMessage `json:"tools"`
	ToolChoice         json.RawMessage   `json:"tool_choice"`
	ParallelToolCalls  *bool             `json:"parallel_tool_calls"`
	Reasoning          json.RawMessage   `json:"reasoning"`
	Text               json.RawMessage   `json:"text"`
	Include            []string          `json:"include"`
	PromptCacheKey     string            `json:"prompt_cache_key"`
	ClientMetadata     json.RawMessage   `json:"client_metadata"`
	Stream             bool              `json:"stream"`
	PreviousResponseID string            `json:"previous_response_id"`
}

// parseResponses normalizes a native Responses body (SPEC §5.1): members the backend takes
// pass through, stream/store are forced, input items lose their ids and system roles.
func parseResponses(body []byte) (responsesCall, error) {
	var r responsesRequest
	ignored, err := decodeBody(body, responsesParams, &r)
	if err != nil {
		return responsesCall{}, err
	}
	if (len(r.Input) == 0 || isNull(r.Input)) && slices.Contains(ignored, "messages") {
		return responsesCall{chatBody: true}, nil
	}
	req, effort, err := baseRequest(r.Model)
	if err != nil {
		return responsesCall{}, err
	}
	c := responsesCall{stream: r.Stream, previousResponseID: r.PreviousResponseID}
	if req.Input, c.ignored, err = responsesInput(r.Input, ignored); err != nil {
		return responsesCall{}, err
	}
	// Tools of every type (function, custom, local_shell, web_search…) are the client's
	// business and pass unchanged.
	req.Tools = append(req.Tools, r.Tools...)
	req.Instructions, req.ParallelToolCalls, req.PromptCacheKey = r.Instructions, r.ParallelToolCalls, r.PromptCacheKey
	if req.Include = r.Include; !slices.Contains(req.Include, encryptedReasoning) {
		req.Include = append(req.Include, encryptedReasoning)
	}
	req.ToolChoice = json.RawMessage(`"auto"`)
	for _, m := range []struct {
		key string
		raw json.RawMessage
		dst *json.RawMessage
	}{{"tool_choice", r.ToolChoice, &req.ToolChoice}, {"reasoning", r.Reasoning, &req.Reasoning},
		{"text", r.Text, &req.Text}, {"client_metadata", r.ClientMetadata, &req.ClientMetadata}} {
		if isNull(m.raw) {
			continue
		}
		if m.raw[0] != '{' && (m.key != "tool_choice" || m.raw[0] != '"') {
			return responsesCall{}, invalidRequest(m.key, "Invalid type for '%s': expected an object.", m.key)
		}
		*m.dst = m.raw
	}
	if effort != "" {
		o := object{}
		_ = json.Unmarshal(req.Reasoning, &o) // checked above; absent leaves o empty
		if isNull(o["effort"]) {
			o["effort"] = marshal(effort)
		}
		req.Reasoning = marshal(o)
	}
	c.req = req
	return c, nil
}

// responsesInput turns input (a string or items) into normalized items. item_reference items
// point at stored items, and nothing is stored with store=false (§3.4), so they are dropped
// and reported.
func responsesInput(raw json.RawMessage, ignored []string) ([]json.RawMessage, []string, error) {
	var s string
	var items []json.RawMessage
	switch {
	case isNull(raw):
	case json.Unmarshal(raw, &s) == nil:
		if s != "" {
			return one(messageItem{"message", "user", []any{textPart{"input_text", s}}}), ignored, nil
		}
	case json.Unmarshal(raw, &items) != nil:
		return nil, nil, invalidRequest("input", "Invalid type for 'input': expected a string or an array.")
	}
	if len(items) == 0 {
		return nil, nil, invalidRequest("input", "Missing required parameter: 'input'.")
	}
	out := make([]json.RawMessage, 0, len(items))
	for i, item := range items {
		var probe struct {
			Type string `json:"type"`
		}
		if json.Unmarshal(item, &probe) == nil && probe.Type == "item_reference" {
			if !slices.Contains(ignored, "input.item_reference") {
				ignored = append(ignored, "input.item_reference")
				slices.Sort(ignored)
			}
			continue
		}
		n, err := normalizeItem(item)
		if err != nil {
			return nil, nil, invalidRequest("input["+strconv.Itoa(i)+"]", "Invalid type for 'input[%d]': expected an object.", i)
		}
		out = append(out, n)
	}
	return out, ignored, nil
}

// normalizeItem makes an input item acceptable with store=false: it removes "id" (server ids
// such as rs_… get 404 "Item with id … not found", §3.4), turns role "system" into
// "developer" ("System messages are not allowed") and adds "type":"message" to the
// type-less message shorthand. The output is canonical (sorted keys, compact), so
// normalizing twice gives the same bytes, which lets sessions compare transcripts.
func normalizeItem(item json.RawMessage) (json.RawMessage, error) {
	var o object
	if err := json.Unmarshal(item, &o); err != nil || o == nil {
		return nil, invalidRequest("input", "Invalid type for input item: expected an object.")
	}
	delete(o, "id")
	if r, ok := o["role"]; ok {
		if string(r) == `"system"` {
			o["role"] = json.RawMessage(`"developer"`)
		}
		if _, ok := o["type"]; !ok {
			o["type"] = json.RawMessage(`"message"`)
		}
	}
	return marshal(o), nil
}

// backendItem is the part of an output item the chat translation reads.
type backendItem struct {
	Type      string        `json:"type"`
	ID        string        `json:"id"`
	CallID    string        `json:"call_id"`
	Name      string        `json:"name"`
	Arguments string        `json:"arguments"`
	Content   []backendPart `json:"content"`
	Summary   []backendPart `json:"summary"`
}

// backendPart is a content or summary part of an output item.
type backendPart struct {
	Text    string `json:"text"`
	Refusal string `json:"refusal"`
}

// backendError is the error of response.failed, or of a WebSocket-style error event.
type backendError struct {
	Type    string `json:"type"`
	Code    string `json:"code"`
	Message string `json:"message"`
}

// backendResponse is the part of the "response" object the translation reads.
type backendResponse struct {
	Output            []json.RawMessage `json:"output"`
	IncompleteDetails struct {
		Reason string `json:"reason"`
	} `json:"incomplete_details"`
	Error *backendError `json:"error"`
	// The usage details may be null (the Codex fixtures have them so): null leaves them zero.
	Usage struct {
		InputTokens        int `json:"input_tokens"`
		OutputTokens       int `json:"output_tokens"`
		TotalTokens        int `json:"total_tokens"`
		InputTokensDetails struct {
			CachedTokens int `json:"cached_tokens"`
		} `json:"input_tokens_details"`
		OutputTokensDetails struct {
			ReasoningTokens int `json:"reasoning_tokens"`
		} `json:"output_tokens_details"`
	} `json:"usage"`
}

// backendEvent is any backend SSE event decoded with encoding/json (the slow path).
type backendEvent struct {
	ItemID       string           `json:"item_id"`
	OutputIndex  int              `json:"output_index"`
	SummaryIndex int              `json:"summary_index"`
	ContentIndex int              `json:"content_index"`
	Delta        string           `json:"delta"`
	Item         json.RawMessage  `json:"item"`
	Response     *backendResponse `json:"response"`
	Code         string           `json:"code"`
	Message      string           `json:"message"`
	Error        *backendError    `json:"error"`
}

// isTerminal reports whether typ ends a successful turn; Codex only knows response.completed,
// peers also accept response.done, and the Responses spec has response.incomplete (§4, §7).
func isTerminal(typ string) bool {
	return typ == "response.completed" || typ == "response.done" || typ == "response.incomplete"
}

// eventError returns the client-facing error of a response.failed or error event.
func eventError(ev *backendEvent) *apiError {
	e := ev.Error
	if ev.Response != nil && ev.Response.Error != nil {
		e = ev.Response.Error
	}
	if e == nil {
		e = &backendError{Code: ev.Code, Message: ev.Message}
	}
	return failureError(cmp.Or(e.Code, e.Type), e.Message)
}

// failureError maps a backend failure code (response.failed error.code, or an error event) to
// the client-facing error, keeping the upstream message verbatim. Codex treats
// context_length_exceeded as the caller's fault and the quota codes as limits (§4 (d), §5.1).
func failureError(code, message string) *apiError {
	e := &apiError{status: 502, typ: "api_error", code: code, message: cmp.Or(message, "upstream response failed ("+cmp.Or(code, "no code")+")")}
	switch code {
	case "context_length_exceeded":
		e.status, e.typ = 400, "invalid_request_error"
	case "rate_limit_exceeded", "insufficient_quota", "usage_not_included", "usage_limit_reached":
		e.status, e.typ = 429, "rate_limit_error"
	}
	return e
}

// turn accumulates what one backend stream said.
type turn struct {
	output    []json.RawMessage // items of response.output_item.done, ordered by output_index
	response  json.RawMessage   // the "response" object of response.completed (also accept response.done, response.incomplete)
	err       *apiError         // set by response.failed or a top-level "error" event
	completed bool              // a terminal success event arrived (completed/done/incomplete)
	indexes   []int             // output_index of each output entry
}

// observe records one backend event; deltas cost one switch.
func (t *turn) observe(typ string, data []byte) {
	switch {
	case typ == "response.output_item.done":
		var ev backendEvent
		if json.Unmarshal(data, &ev) != nil || len(ev.Item) == 0 {
			return
		}
		i, _ := slices.BinarySearch(t.indexes, ev.OutputIndex+1) // after equal indexes: arrival order
		t.indexes = slices.Insert(t.indexes, i, ev.OutputIndex)
		t.output = slices.Insert(t.output, i, ev.Item)
	case isTerminal(typ):
		var ev struct {
			Response json.RawMessage `json:"response"`
		}
		if json.Unmarshal(data, &ev) == nil {
			t.response, t.completed = ev.Response, true
		}
	case typ == "response.failed" || typ == "error":
		var ev backendEvent
		_ = json.Unmarshal(data, &ev) // a garbled failure is still a failure
		t.err = eventError(&ev)
	}
}

// items returns the turn's output items: response.completed's output, or the
// output_item.done items when it is sparse (the Codex CLI's fixtures send "output":[], §0, §4).
func (t *turn) items() (*backendResponse, []json.RawMessage) {
	var r backendResponse
	_ = json.Unmarshal(t.response, &r) // absent or garbled: the streamed items still count
	if len(r.Output) == 0 {
		r.Output = t.output
	}
	return &r, r.Output
}

// responseObject is the final Responses API object for non-streaming clients: the completed response with "output"
// filled from t.output when missing or empty (a sparse response.completed), and "output_text" (all output_text parts joined).
func (t *turn) responseObject() []byte {
	var o object
	if json.Unmarshal(t.response, &o) != nil || o == nil {
		o = object{"object": json.RawMessage(`"response"`)}
	}
	_, items := t.items()
	if items == nil {
		items = []json.RawMessage{}
	}
	o["output"] = marshal(items)
	o["output_text"] = marshal(string(replay(items, reasoningNone).text))
	return marshal(o)
}

// messageText joins the output_text (and refusal) parts of a message item.
func messageText(it *backendItem) string {
	var b strings.Builder
	for _, p := range it.Content {
		b.WriteString(p.Text + p.Refusal)
	}
	return b.String()
}

// usage is the turn's usage as a Chat Completions usage object.
func (r *backendResponse) usage() []byte {
	u := r.Usage
	return fmt.Appendf(nil, `{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d,"prompt_tokens_details":{"cached_tokens":%d},"completion_tokens_details":{"reasoning_tokens":%d}}`,
		u.InputTokens, u.OutputTokens, cmp.Or(u.TotalTokens, u.InputTokens+u.OutputTokens), u.InputTokensDetails.CachedTokens, u.OutputTokensDetails.ReasoningTokens)
}

// finishReason maps how the turn ended to the chat finish_reason.
func (r *backendResponse) finishReason(toolCalls bool) string {
	switch reason := r.IncompleteDetails.Reason; {
	case toolCalls:
		return "tool_calls"
	case reason == "max_output_tokens":
		return "length"
	case reason == "content_filter":
		return reason
	}
	return "stop"
}

// chatAnswer is the message of a non-streaming chat completion.
type chatAnswer struct {
	Role             string         `json:"role"`
	Content          *string        `json:"content"`
	ReasoningContent string         `json:"reasoning_content,omitempty"`
	ToolCalls        []chatToolCall `json:"tool_calls,omitempty"`
	text, reasoning  []byte
}

// chatToolCall is a tool call of a chat.completion message.
type chatToolCall struct {
	ID       string `json:"id"`
	Type     string `json:"type"`
	Function struct {
		Name      string `json:"name"`
		Arguments string `json:"arguments"`
	} `json:"function"`
}

// replay runs finished output items through a chat stream that collects the answer instead of
// emitting chunks, so both paths read items alike. Every item's parts are parts of their own,
// and a separator needs reasoning before it.
func replay(items []json.RawMessage, mode reasoningMode) *chatAnswer {
	s := &chatStream{mode: mode, tagsDone: true, answer: &chatAnswer{Role: "assistant"}}
	for _, raw := range items {
		var it backendItem
		if json.Unmarshal(raw, &it) == nil {
			s.partKind = 0
			s.item(&it)
		}
	}
	return s.answer
}

// chatCompletion builds the non-streaming chat.completion from a finished turn. Unlike the
// stream, which cannot take back tags it already sent, it has no tags when the turn calls tools.
func chatCompletion(t *turn, id string, created int64, model string, mode reasoningMode, jsonMode bool) []byte {
	r, items := t.items()
	m := replay(items, mode)
	text, calls := string(m.text), len(m.ToolCalls) > 0
	if m.ReasoningContent = string(m.reasoning); mode == reasoningTags && !jsonMode && !calls && m.ReasoningContent != "" && text != "" {
		text = "<reasoning>" + m.ReasoningContent + "</reasoning>\n\n" + text // the guide's tags (--reasoning tags)
	}
	if text != "" || !calls {
		m.Content = &text
	}
	choice := marshal(struct {
		Index        int         `json:"index"`
		Message      *chatAnswer `json:"message"`
		FinishReason string      `json:"finish_reason"`
	}{0, m, r.finishReason(calls)})
	return fmt.Appendf(chatHead("chat.completion", id, created, model), `%s],"usage":%s}`, choice, r.usage())
}

// toolCallState is one function call of a chat stream.
type toolCallState struct {
	itemID   string // deltas are keyed by item id (fc_…), not call_id (§4 (c))
	callID   string
	argsSent bool
}

// chatStream turns backend events into chat.completion.chunk payloads as they arrive.
type chatStream struct {
	head         []byte // every chunk up to `"choices":[`
	mode         reasoningMode
	includeUsage bool
	roleSent     bool
	done         bool
	sawItems     bool            // an output_item.done arrived: response.completed's output is not needed
	streamed     []string        // ids of items whose text or reasoning came as deltas
	calls        []toolCallState // index in this slice is the chat tool call index
	partItem     string          // reasoning part being streamed: item id, kind, index
	partKind     byte
	partIndex    int
	reasoned     bool   // some reasoning was streamed (later parts get a "\n\n" separator)
	tags         []byte // reasoning held back for the tags, until the turn shows text or a call
	tagsDone     bool
	buf, scratch []byte             // reused: emit must not retain chunks
	unquoted     string             // an escaped delta, decoded into a field so that its address costs nothing
	emit         func([]byte) error // the current event's
	err          error              // the first error of emit: nothing is emitted after it
	answer       *chatAnswer        // set by replay: content and calls are collected, not emitted
}

// newChatStream starts a chat stream; id, created and model appear in every chunk.
func newChatStream(id string, created int64, model string, mode reasoningMode, jsonMode, includeUsage bool) *chatStream {
	return &chatStream{head: chatHead("chat.completion.chunk", id, created, model), mode: mode,
		includeUsage: includeUsage, tagsDone: mode != reasoningTags || jsonMode}
}

// chatHead is the start of a chat.completion or a chunk, up to `"choices":[`.
func chatHead(object, id string, created int64, model string) []byte {
	return fmt.Appendf(nil, `{"id":%s,"object":%q,"created":%d,"model":%s,"choices":[`, marshal(id), object, created, marshal(model))
}

// event translates one backend event into zero or more chunk JSON payloads, passed to emit in order.
// emit must not retain the slice (you may reuse a buffer). A response.failed / error event returns its *apiError.
func (s *chatStream) event(typ string, data []byte, emit func(chunk []byte) error) error {
	if s.done {
		return nil
	}
	s.emit = emit
	if strings.HasSuffix(typ, ".delta") {
		id, delta, idx, ok := s.fastDelta(data)
		switch {
		case !ok:
		case typ == "response.output_text.delta":
			s.text(id, delta)
		case typ == "response.reasoning_summary_text.delta" || typ == "response.reasoning_text.delta":
			s.markStreamed(id)
			s.reasoning(id, typ[19], idx, delta) // typ[19]: 's'ummary or 't'ext
		case typ == "response.function_call_arguments.delta":
			if i := slices.IndexFunc(s.calls, func(c toolCallState) bool { return c.itemID == string(id) }); i >= 0 {
				s.calls[i].argsSent = true
				s.toolCall(i, nil, delta)
			}
		}
		return s.err
	}
	var ev backendEvent
	if err := json.Unmarshal(data, &ev); err != nil && !isTerminal(typ) && typ != "response.failed" && typ != "error" {
		return nil // an unknown or garbled event cannot change the answer
	}
	switch {
	case typ == "response.output_item.added":
		var it backendItem
		if json.Unmarshal(ev.Item, &it) == nil && it.Type == "function_call" {
			s.newCall(&it)
		}
	case typ == "response.output_item.done":
		s.sawItems = true
		s.itemDone(ev.Item)
	case isTerminal(typ):
		r := cmp.Or(ev.Response, &backendResponse{})
		if !s.sawItems { // no output_item.done at all: the items exist only in response.completed
			for _, raw := range r.Output {
				s.itemDone(raw)
			}
		}
		s.finish(r)
	case typ == "response.failed" || typ == "error":
		return eventError(&ev)
	}
	return s.err
}

// fastDelta reads item_id, the decoded delta and the part index of a delta event. Deltas are
// most of a stream, so the flat shape the backend sends is scanned in place; escapes in the
// delta cost one encoding/json string decode, and any other shape goes to encoding/json whole.
func (s *chatStream) fastDelta(data []byte) (id, delta []byte, idx int, ok bool) {
	id, raw, idx, ok := scanDelta(data)
	if ok && bytes.IndexByte(raw, '\\') < 0 {
		return id, raw[1 : len(raw)-1], idx, true
	}
	if ok && json.Unmarshal(raw, &s.unquoted) == nil {
		s.scratch = append(s.scratch[:0], s.unquoted...)
		return id, s.scratch, idx, true
	}
	var ev backendEvent
	if json.Unmarshal(data, &ev) != nil {
		return nil, nil, 0, false
	}
	return []byte(ev.ItemID), []byte(ev.Delta), ev.SummaryIndex + ev.ContentIndex, true
}

// markStreamed remembers that item id's text came as deltas.
func (s *chatStream) markStreamed(id []byte) {
	if !slices.Contains(s.streamed, string(id)) {
		s.streamed = append(s.streamed, string(id))
	}
}

// open starts a chunk in s.buf, first sending the role chunk if it has not gone out yet. The
// role waits for the first real chunk so that a failure before any output can still be
// answered with a proper HTTP error status.
func (s *chatStream) open() {
	if !s.roleSent {
		s.roleSent = true
		s.buf = append(s.buf[:0], s.head...)
		s.send(`{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}`)
	}
	s.buf = append(append(s.buf[:0], s.head...), `{"index":0,"delta":`...)
}

// send ends the chunk in s.buf with tail and emits it, unless an emit failed before.
func (s *chatStream) send(tail string) {
	if s.buf = append(s.buf, tail...); s.err == nil {
		s.err = s.emit(s.buf)
	}
}

// text emits answer text, preceded once by the held-back reasoning tags.
func (s *chatStream) text(id, text []byte) {
	s.markStreamed(id)
	if !s.tagsDone && len(s.tags) > 0 {
		s.content(`"content"`, []byte("<reasoning>"), s.tags, []byte("</reasoning>\n\n"))
	}
	s.tagsDone = true
	s.content(`"content"`, nil, text, nil)
}

// content emits {key: pre+text+post} as one delta.
func (s *chatStream) content(key string, pre, text, post []byte) {
	if a := s.answer; a != nil {
		dst := &a.text
		if key[1] == 'r' {
			dst = &a.reasoning
		}
		if len(*dst) == 0 {
			pre = nil
		}
		*dst = append(append(append(*dst, pre...), text...), post...)
		return
	}
	s.open()
	s.buf = append(append(append(s.buf, '{'), key...), ':', '"')
	s.buf = append(appendEscaped(appendEscaped(appendEscaped(s.buf, pre), text), post), '"', '}')
	s.send(`,"finish_reason":null}]}`)
}

// reasoning streams a reasoning delta as reasoning_content and keeps it for the tags; a new
// summary part (or item) is separated from the previous one by a blank line.
func (s *chatStream) reasoning(id []byte, kind byte, idx int, delta []byte) {
	if s.mode == reasoningNone {
		return
	}
	var sep []byte
	if s.partItem != string(id) || s.partKind != kind || s.partIndex != idx {
		if s.reasoned {
			sep = []byte("\n\n")
		}
		s.partItem, s.partKind, s.partIndex = string(id), kind, idx
	}
	s.reasoned = true
	if !s.tagsDone {
		s.tags = append(append(s.tags, sep...), delta...)
	}
	s.content(`"reasoning_content"`, sep, delta, nil)
}

// newCall registers a function call and emits its id and name; the tags are dropped because
// the turn goes to tool calls (SPEC §4).
func (s *chatStream) newCall(it *backendItem) {
	s.tagsDone = true
	s.calls = append(s.calls, toolCallState{it.ID, it.CallID, it.Arguments != ""})
	s.toolCall(len(s.calls)-1, it, []byte(it.Arguments))
}

// toolCall emits one tool_calls delta: the header (id, type, name) when it is given, else an
// arguments fragment.
func (s *chatStream) toolCall(i int, it *backendItem, args []byte) {
	if a := s.answer; a != nil { // replay sends each call whole, once
		tc := chatToolCall{ID: it.CallID, Type: "function"}
		tc.Function.Name, tc.Function.Arguments = it.Name, string(args)
		a.ToolCalls = append(a.ToolCalls, tc)
		return
	}
	s.open()
	s.buf = strconv.AppendInt(append(s.buf, `{"tool_calls":[{"index":`...), int64(i), 10)
	if it != nil {
		s.buf = appendString(append(s.buf, `,"id":`...), []byte(it.CallID))
		s.buf = appendString(append(s.buf, `,"type":"function","function":{"name":`...), []byte(it.Name))
		s.buf = append(s.buf, ',')
	} else {
		s.buf = append(s.buf, `,"function":{`...)
	}
	s.buf = append(appendString(append(s.buf, `"arguments":`...), args), "}}]}"...)
	s.send(`,"finish_reason":null}]}`)
}

// itemDone emits what a finished item holds that its deltas did not deliver: the whole text
// or reasoning of a sparse stream (the Codex fixtures send only output_item.done, §0), a call
// never announced, or arguments that never came as deltas.
func (s *chatStream) itemDone(raw json.RawMessage) {
	var it backendItem
	if json.Unmarshal(raw, &it) != nil || slices.Contains(s.streamed, it.ID) && it.ID != "" {
		return
	}
	for i, c := range s.calls {
		if it.Type == "function_call" && (c.itemID == it.ID && it.ID != "" || c.callID == it.CallID && it.CallID != "") {
			if !c.argsSent && it.Arguments != "" {
				s.calls[i].argsSent = true
				s.toolCall(i, nil, []byte(it.Arguments))
			}
			return
		}
	}
	s.item(&it)
}

// item emits the whole of an item: its text, its reasoning parts or its call.
func (s *chatStream) item(it *backendItem) {
	switch it.Type {
	case "message":
		if t := messageText(it); t != "" {
			s.text([]byte(it.ID), []byte(t))
		}
	case "reasoning":
		for i, p := range slices.Concat(it.Content, it.Summary) {
			s.reasoning([]byte(it.ID), 'd', i, []byte(p.Text))
		}
	case "function_call":
		s.newCall(it)
	}
}

// finish emits the one chunk with a finish_reason and, when asked for, the usage chunk.
func (s *chatStream) finish(r *backendResponse) {
	s.done = true
	s.open()
	s.buf = appendString(append(s.buf, `{},"finish_reason":`...), []byte(r.finishReason(len(s.calls) > 0)))
	s.send("}]}")
	if s.includeUsage {
		s.buf = append(append(append(s.buf[:0], s.head...), `],"usage":`...), r.usage()...)
		s.send("}")
	}
}

// scanDelta finds the item_id, delta (raw: quoted, still escaped) and summary_index or
// content_index of a delta event without allocating. It knows only the compact, flat shape
// the backend sends: ok is false for anything else (space, escaped keys, values of other
// types, nested values with commas, bad syntax), and the caller then asks encoding/json.
func scanDelta(data []byte) (id, delta []byte, idx int, ok bool) {
	if len(data) < 2 || data[0] != '{' || data[len(data)-1] != '}' {
		return
	}
	for i := 1; ; {
		end := stringEnd(data, i)
		if end < 0 || end == len(data) || data[end] != ':' || bytes.IndexByte(data[i:end], '\\') >= 0 {
			return
		}
		key, v := string(data[i+1:end-1]), end+1
		if end = stringEnd(data, v); end < 0 { // not a string: a number, literal or [] (no strings)
			for end = v; end < len(data) && strings.IndexByte(`,}"`, data[end]) < 0; end++ {
			}
		}
		switch {
		case end >= len(data) || data[end] != ',' && end != len(data)-1:
			return
		case key == "item_id" && (data[v] != '"' || bytes.IndexByte(data[v:end], '\\') >= 0),
			key == "delta" && data[v] != '"':
			return
		case key == "item_id":
			id = data[v+1 : end-1]
		case key == "delta":
			delta = data[v:end]
		case key == "summary_index" || key == "content_index":
			n, err := strconv.Atoi(string(data[v:end]))
			if err != nil {
				return
			}
			idx = n
		}
		if end == len(data)-1 {
			return id, delta, idx, delta != nil
		}
		i = end + 1
	}
}

// stringEnd returns the index after the JSON string that starts at data[i], or -1.
func stringEnd(data []byte, i int) int {
	if i >= len(data) || data[i] != '"' {
		return -1
	}
	for i++; i < len(data); i++ {
		switch data[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return -1
}

// appendString appends s as a JSON string.
func appendString(dst, s []byte) []byte {
	return append(appendEscaped(append(dst, '"'), s), '"')
}

// appendEscaped appends s escaped for the inside of a JSON string, byte for byte as
// encoding/json does without HTML escaping: short escapes, \u00XX for other control
// characters, \u2028 and \u2029 (JavaScript line terminators), U+FFFD for invalid UTF-8.
func appendEscaped(dst, s []byte) []byte {
	const hex = "0123456789abcdef"
	start := 0
	for i := 0; i < len(s); {
		c, size := rune(s[i]), 1
		if c >= utf8.RuneSelf {
			c, size = utf8.DecodeRune(s[i:])
		}
		if c >= 0x20 && c != '"' && c != '\\' && c != '\u2028' && c != '\u2029' && (c != utf8.RuneError || size > 1) {
			i += size
			continue
		}
		dst = append(dst, s[start:i]...)
		if k := strings.IndexRune("\"\\\b\f\n\r\t", c); k >= 0 {
			dst = append(dst, '\\', `"\bfnrt`[k])
		} else {
			dst = append(dst, '\\', 'u', hex[c>>12], hex[c>>8&0xf], hex[c>>4&0xf], hex[c&0xf])
		}
		i += size
		start = i
	}
	return append(dst, s[start:]...)
}
