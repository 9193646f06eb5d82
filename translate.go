package main

import (
	"bytes"
	"cmp"
	"encoding/json"
	"errors"
	"slices"
	"strconv"
	"strings"
	"unicode/utf16"
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
}

// encryptedReasoning is the include value that makes the backend return reasoning items it
// can read back with store=false; sessions replay them (codex-backend §4 (b)).
const encryptedReasoning = "reasoning.encrypted_content"

// chatParams are the Chat Completions parameters parseChat translates; every other top-level
// member is dropped and reported, so nothing unknown reaches a backend that 400s on
// "Unsupported parameter" (codex-backend §3.4).
var chatParams = []string{"model", "messages", "stream", "stream_options", "tools", "tool_choice",
	"parallel_tool_calls", "response_format", "reasoning_effort", "verbosity"}

// responsesParams are the Responses parameters parseResponses keeps or consumes.
var responsesParams = []string{"model", "input", "instructions", "tools", "tool_choice", "parallel_tool_calls",
	"reasoning", "text", "include", "prompt_cache_key", "client_metadata", "stream", "previous_response_id"}

// object is a JSON object decoded one level deep, so that each member's type can be checked
// and the members nobody translates can be named.
type object map[string]json.RawMessage

// decodeBody parses a request body that must be a JSON object.
func decodeBody(body []byte) (object, error) {
	var o object
	if err := json.Unmarshal(body, &o); err != nil || o == nil {
		// OpenAI answers a body it cannot parse with param null; there is no parameter to name.
		return nil, invalidRequest("", "We could not parse the JSON body of your request: expected a JSON object.")
	}
	return o, nil
}

// field decodes member key of o into v; it reports false for an absent or null member and an
// invalid-type error naming param (plus the inner field encoding/json found) otherwise.
func field(o object, key, param, want string, v any) (bool, error) {
	raw, ok := o[key]
	if !ok || isNull(raw) {
		return false, nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		if te := (*json.UnmarshalTypeError)(nil); errors.As(err, &te) && te.Field != "" {
			param += "." + te.Field
			want = te.Type.String()
		}
		return false, invalidRequest(param, "Invalid type for '%s': expected %s.", param, want)
	}
	return true, nil
}

// fieldSpec names a member, the type it must have (for the message), and its destination.
type fieldSpec struct {
	key, want string
	v         any
}

// decodeFields decodes members with field, stopping at the first error.
func decodeFields(o object, specs ...fieldSpec) error {
	for _, f := range specs {
		if _, err := field(o, f.key, f.key, f.want, f.v); err != nil {
			return err
		}
	}
	return nil
}

// isNull reports whether raw is the JSON literal null.
func isNull(raw json.RawMessage) bool { return string(bytes.TrimSpace(raw)) == "null" }

// marshal encodes v without HTML escaping (the bytes go to APIs, not to browsers).
func marshal(v any) json.RawMessage {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	// Only structs, strings, maps and already-valid RawMessages are encoded here: no error is possible.
	_ = enc.Encode(v)
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

// ignoredParams lists the non-null members of o outside known, sorted. store:false is not
// listed: it is exactly what upstream gets anyway.
func ignoredParams(o object, known []string) []string {
	var out []string
	for k, v := range o {
		if slices.Contains(known, k) || isNull(v) || (k == "store" && string(bytes.TrimSpace(v)) == "false") {
			continue
		}
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// baseRequest fills the members the backend insists on (codex-backend §0, §3.3, §3.4).
func baseRequest(o object) (upstreamRequest, string, error) {
	var model string
	ok, err := field(o, "model", "model", "a string", &model)
	if err != nil {
		return upstreamRequest{}, "", err
	}
	if !ok || model == "" {
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

// imagePart is an input_image content part; the backend wants image_url as a plain string.
type imagePart struct {
	Type     string `json:"type"`
	ImageURL string `json:"image_url"`
	Detail   string `json:"detail,omitempty"`
}

// messageItem is a Responses message input item.
type messageItem struct {
	Type    string `json:"type"`
	Role    string `json:"role"`
	Content []any  `json:"content"`
}

// functionCallItem is a function_call input item (an assistant tool call being replayed).
type functionCallItem struct {
	Type      string `json:"type"`
	Name      string `json:"name"`
	Arguments string `json:"arguments"`
	CallID    string `json:"call_id"`
}

// functionOutputItem is a function_call_output input item (a tool result).
type functionOutputItem struct {
	Type   string `json:"type"`
	CallID string `json:"call_id"`
	Output string `json:"output"`
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
	o, err := decodeBody(body)
	if err != nil {
		return chatCall{}, err
	}
	req, effort, err := baseRequest(o)
	if err != nil {
		return chatCall{}, err
	}
	c := chatCall{ignored: ignoredParams(o, chatParams)}
	n, re, msgs := 1, "", []json.RawMessage(nil)
	var so struct {
		IncludeUsage bool `json:"include_usage"`
	}
	// Codex sends parallel_tool_calls false unless the model family supports it (§3.3);
	// the chat default is the conservative one.
	req.ParallelToolCalls = new(bool)
	if err := decodeFields(o, fieldSpec{"n", "an integer", &n}, fieldSpec{"messages", "an array", &msgs},
		fieldSpec{"stream", "a boolean", &c.stream}, fieldSpec{"stream_options", "an object", &so},
		fieldSpec{"parallel_tool_calls", "a boolean", req.ParallelToolCalls},
		fieldSpec{"reasoning_effort", "a string", &re}); err != nil {
		return chatCall{}, err
	}
	if n != 1 {
		return chatCall{}, invalidRequest("n", "Invalid value for 'n': ccproxy supports only n=1, got %d.", n)
	}
	if len(msgs) == 0 {
		return chatCall{}, invalidRequest("messages", "Missing required parameter: 'messages'.")
	}
	for i, raw := range msgs {
		items, err := chatItems(raw, "messages["+strconv.Itoa(i)+"]")
		if err != nil {
			return chatCall{}, err
		}
		req.Input = append(req.Input, items...)
	}
	c.includeUsage = so.IncludeUsage && c.stream
	if req.Tools, err = chatTools(o); err != nil {
		return chatCall{}, err
	}
	if req.ToolChoice, err = chatToolChoice(o); err != nil {
		return chatCall{}, err
	}
	if req.Text, c.jsonMode, err = chatText(o); err != nil {
		return chatCall{}, err
	}
	// An explicit reasoning_effort beats the model-name suffix; summary "auto" is what Codex sends.
	req.Reasoning = marshal(struct {
		Effort  string `json:"effort,omitempty"`
		Summary string `json:"summary"`
	}{cmp.Or(re, effort), "auto"})
	c.req = req
	return c, nil
}

// chatItems turns one chat message into Responses input items.
func chatItems(raw json.RawMessage, param string) ([]json.RawMessage, error) {
	var m chatMessage
	if _, err := field(object{"m": raw}, "m", param, "an object", &m); err != nil {
		return nil, err
	}
	switch m.Role {
	case "system", "developer", "user", "assistant":
		// The backend answers role system with "System messages are not allowed" (§3.4);
		// only user messages take images; assistant text is output_text.
		role, textType := m.Role, "input_text"
		switch role {
		case "system":
			role = "developer"
		case "assistant":
			textType = "output_text"
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
			items = append(items, marshal(functionCallItem{"function_call", tc.Function.Name, tc.Function.Arguments, tc.ID}))
		}
		return items, nil
	case "tool":
		if m.ToolCallID == "" {
			return nil, invalidRequest(param+".tool_call_id", "Missing required parameter: '%s.tool_call_id'.", param)
		}
		parts, err := chatContent(m.Content, param, "input_text", false)
		var out strings.Builder
		for _, p := range parts {
			out.WriteString(p.(textPart).Text)
		}
		return one(functionOutputItem{"function_call_output", m.ToolCallID, out.String()}), err
	case "":
		return nil, invalidRequest(param+".role", "Missing required parameter: '%s.role'.", param)
	}
	return nil, invalidRequest(param+".role", "Invalid value for '%s.role': %q is not supported.", param, m.Role)
}

// one encodes a single item.
func one(v any) []json.RawMessage { return []json.RawMessage{marshal(v)} }

// chatContent converts message content (a string or an array of parts) to Responses parts of
// textType; images are allowed only where the backend takes them (user messages).
func chatContent(raw json.RawMessage, param, textType string, images bool) ([]any, error) {
	if len(raw) == 0 || isNull(raw) {
		return nil, nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
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
			out = append(out, imagePart{"input_image", img.URL, img.Detail})
		default:
			return nil, invalidRequest(pp+".type", "Invalid value for '%s.type': %q is not supported here.", pp, p.Type)
		}
	}
	return out, nil
}

// chatTools flattens chat tools: the backend wants {type,name,…} and 400s on the nested
// chat shape with "Missing required parameter: 'tools[0].name'" (§3.3).
func chatTools(o object) ([]json.RawMessage, error) {
	var tools []struct {
		Type     string `json:"type"`
		Function *struct {
			Name        string          `json:"name"`
			Description string          `json:"description,omitempty"`
			Parameters  json.RawMessage `json:"parameters"`
			Strict      bool            `json:"strict"`
		} `json:"function"`
	}
	if _, err := field(o, "tools", "tools", "an array", &tools); err != nil {
		return nil, err
	}
	out := []json.RawMessage{}
	for i, t := range tools {
		p := "tools[" + strconv.Itoa(i) + "]"
		if t.Type != "function" {
			return nil, invalidRequest(p+".type", "Invalid value for '%s.type': only function tools are supported, got %q.", p, t.Type)
		}
		if t.Function == nil || t.Function.Name == "" {
			return nil, invalidRequest(p+".function.name", "Missing required parameter: '%s.function.name'.", p)
		}
		f := *t.Function
		if len(f.Parameters) == 0 || isNull(f.Parameters) {
			f.Parameters = json.RawMessage(`{"type":"object","properties":{}}`)
		}
		out = append(out, marshal(struct {
			Type string          `json:"type"`
			Name string          `json:"name"`
			Desc string          `json:"description,omitempty"`
			Par  json.RawMessage `json:"parameters"`
			Str  bool            `json:"strict"`
		}{"function", f.Name, f.Description, f.Parameters, f.Strict}))
	}
	return out, nil
}

// chatToolChoice maps tool_choice: strings pass, {type:function,function:{name}} is flattened
// like the tools themselves, other objects pass unchanged; Codex's default is "auto".
func chatToolChoice(o object) (json.RawMessage, error) {
	raw, ok := o["tool_choice"]
	if !ok || isNull(raw) {
		return json.RawMessage(`"auto"`), nil
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return marshal(s), nil
	}
	var tc struct {
		Type     string `json:"type"`
		Function struct {
			Name string `json:"name"`
		} `json:"function"`
	}
	if err := json.Unmarshal(raw, &tc); err != nil {
		return nil, invalidRequest("tool_choice", "Invalid type for 'tool_choice': expected a string or an object.")
	}
	if tc.Type == "function" && tc.Function.Name != "" {
		return marshal(struct {
			Type string `json:"type"`
			Name string `json:"name"`
		}{"function", tc.Function.Name}), nil
	}
	return raw, nil
}

// chatText maps response_format to text.format and verbosity to text.verbosity (§3.3).
func chatText(o object) (json.RawMessage, bool, error) {
	var rf struct {
		Type       string `json:"type"`
		JSONSchema struct {
			Name        string          `json:"name"`
			Description string          `json:"description,omitempty"`
			Schema      json.RawMessage `json:"schema"`
			Strict      bool            `json:"strict"`
		} `json:"json_schema"`
	}
	var text struct {
		Format    any    `json:"format,omitempty"`
		Verbosity string `json:"verbosity,omitempty"`
	}
	if _, err := field(o, "response_format", "response_format", "an object", &rf); err != nil {
		return nil, false, err
	}
	if _, err := field(o, "verbosity", "verbosity", "a string", &text.Verbosity); err != nil {
		return nil, false, err
	}
	switch rf.Type {
	case "", "text":
	case "json_object":
		text.Format = map[string]string{"type": "json_object"}
	case "json_schema":
		js := rf.JSONSchema
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
		return nil, false, invalidRequest("response_format.type", "Invalid value for 'response_format.type': %q is not supported.", rf.Type)
	}
	if text.Format == nil && text.Verbosity == "" {
		return nil, false, nil
	}
	return marshal(text), text.Format != nil, nil
}

// parseResponses normalizes a native Responses body (SPEC §5.1): members the backend takes
// pass through, stream/store are forced, input items lose their ids and system roles.
func parseResponses(body []byte) (responsesCall, error) {
	o, err := decodeBody(body)
	if err != nil {
		return responsesCall{}, err
	}
	req, effort, err := baseRequest(o)
	if err != nil {
		return responsesCall{}, err
	}
	c := responsesCall{ignored: ignoredParams(o, responsesParams)}
	if req.Input, c.ignored, err = responsesInput(o, c.ignored); err != nil {
		return responsesCall{}, err
	}
	var tools []json.RawMessage
	if err := decodeFields(o, fieldSpec{"instructions", "a string", &req.Instructions},
		fieldSpec{"tools", "an array", &tools}, fieldSpec{"parallel_tool_calls", "a boolean", &req.ParallelToolCalls},
		fieldSpec{"include", "an array of strings", &req.Include}, fieldSpec{"prompt_cache_key", "a string", &req.PromptCacheKey},
		fieldSpec{"stream", "a boolean", &c.stream}, fieldSpec{"previous_response_id", "a string", &c.previousResponseID}); err != nil {
		return responsesCall{}, err
	}
	// Tools of every type (function, custom, local_shell, web_search…) are the client's
	// business and pass unchanged.
	req.Tools = append(req.Tools, tools...)
	if !slices.Contains(req.Include, encryptedReasoning) {
		req.Include = append(req.Include, encryptedReasoning)
	}
	req.ToolChoice = json.RawMessage(`"auto"`)
	for key, dst := range map[string]*json.RawMessage{"tool_choice": &req.ToolChoice, "reasoning": &req.Reasoning,
		"text": &req.Text, "client_metadata": &req.ClientMetadata} {
		var probe any
		if ok, err := field(o, key, key, "an object", &probe); err != nil {
			return responsesCall{}, err
		} else if ok {
			if _, isObj := probe.(map[string]any); !isObj && (key != "tool_choice" || !isString(probe)) {
				return responsesCall{}, invalidRequest(key, "Invalid type for '%s': expected an object.", key)
			}
			*dst = o[key]
		}
	}
	if effort != "" {
		r := object{}
		_ = json.Unmarshal(req.Reasoning, &r) // checked above; absent leaves r empty
		if e, ok := r["effort"]; !ok || isNull(e) {
			r["effort"] = marshal(effort)
		}
		req.Reasoning = marshal(r)
	}
	c.req = req
	return c, nil
}

// isString reports whether v (decoded into any) is a string.
func isString(v any) bool { _, ok := v.(string); return ok }

// responsesInput turns input (a string or items) into normalized items. item_reference items
// point at stored items, and nothing is stored with store=false (§3.4), so they are dropped
// and reported.
func responsesInput(o object, ignored []string) ([]json.RawMessage, []string, error) {
	raw := o["input"]
	var s string
	if json.Unmarshal(raw, &s) == nil {
		if s == "" {
			return nil, nil, invalidRequest("input", "Missing required parameter: 'input'.")
		}
		return one(messageItem{"message", "user", []any{textPart{"input_text", s}}}), ignored, nil
	}
	var items []json.RawMessage
	if _, err := field(o, "input", "input", "a string or an array", &items); err != nil {
		return nil, nil, err
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
	Type    string `json:"type"`
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
	Status            string            `json:"status"`
	Output            []json.RawMessage `json:"output"`
	IncompleteDetails *struct {
		Reason string `json:"reason"`
	} `json:"incomplete_details"`
	Error *backendError `json:"error"`
	Usage *struct {
		InputTokens        int `json:"input_tokens"`
		OutputTokens       int `json:"output_tokens"`
		TotalTokens        int `json:"total_tokens"`
		InputTokensDetails *struct {
			CachedTokens int `json:"cached_tokens"`
		} `json:"input_tokens_details"`
		OutputTokensDetails *struct {
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
	text, _, _ := collect(items)
	o["output_text"] = marshal(text)
	return marshal(o)
}

// collect reads an answer out of output items: the text of message items, reasoning
// summaries (and raw reasoning text) joined by blank lines, and function calls.
func collect(items []json.RawMessage) (text, reasoning string, calls []backendItem) {
	var t, r strings.Builder
	for _, raw := range items {
		var it backendItem
		if json.Unmarshal(raw, &it) != nil {
			continue
		}
		switch it.Type {
		case "message":
			t.WriteString(messageText(&it))
		case "reasoning":
			for _, p := range slices.Concat(it.Content, it.Summary) {
				if r.Len() > 0 {
					r.WriteString("\n\n")
				}
				r.WriteString(p.Text)
			}
		case "function_call":
			calls = append(calls, it)
		}
	}
	return t.String(), r.String(), calls
}

// messageText joins the output_text (and refusal) parts of a message item.
func messageText(it *backendItem) string {
	var b strings.Builder
	for _, p := range it.Content {
		b.WriteString(p.Text + p.Refusal)
	}
	return b.String()
}

// chatUsage is the Chat Completions usage object.
type chatUsage struct {
	PromptTokens        int `json:"prompt_tokens"`
	CompletionTokens    int `json:"completion_tokens"`
	TotalTokens         int `json:"total_tokens"`
	PromptTokensDetails struct {
		CachedTokens int `json:"cached_tokens"`
	} `json:"prompt_tokens_details"`
	CompletionTokensDetails struct {
		ReasoningTokens int `json:"reasoning_tokens"`
	} `json:"completion_tokens_details"`
}

// usage converts backend usage; its details may be null (the Codex fixtures have them so).
func (r *backendResponse) usage() chatUsage {
	var u chatUsage
	if r.Usage == nil {
		return u
	}
	u.PromptTokens, u.CompletionTokens = r.Usage.InputTokens, r.Usage.OutputTokens
	u.TotalTokens = cmp.Or(r.Usage.TotalTokens, u.PromptTokens+u.CompletionTokens)
	if d := r.Usage.InputTokensDetails; d != nil {
		u.PromptTokensDetails.CachedTokens = d.CachedTokens
	}
	if d := r.Usage.OutputTokensDetails; d != nil {
		u.CompletionTokensDetails.ReasoningTokens = d.ReasoningTokens
	}
	return u
}

// finishReason maps how the turn ended to the chat finish_reason.
func (r *backendResponse) finishReason(toolCalls bool) string {
	switch {
	case toolCalls:
		return "tool_calls"
	case r.IncompleteDetails != nil && r.IncompleteDetails.Reason == "max_output_tokens":
		return "length"
	case r.IncompleteDetails != nil && r.IncompleteDetails.Reason == "content_filter":
		return "content_filter"
	}
	return "stop"
}

// tagged wraps reasoning in the tags the guide shows in front of the answer (--reasoning tags).
func tagged(reasoning string) string { return "<reasoning>" + reasoning + "</reasoning>\n\n" }

// chatCompletion builds the non-streaming chat.completion from a finished turn.
func chatCompletion(t *turn, id string, created int64, model string, mode reasoningMode, jsonMode bool) []byte {
	r, items := t.items()
	text, reasoning, calls := collect(items)
	type toolCall struct {
		ID       string `json:"id"`
		Type     string `json:"type"`
		Function struct {
			Name      string `json:"name"`
			Arguments string `json:"arguments"`
		} `json:"function"`
	}
	msg := struct {
		Role             string     `json:"role"`
		Content          *string    `json:"content"`
		ReasoningContent string     `json:"reasoning_content,omitempty"`
		ToolCalls        []toolCall `json:"tool_calls,omitempty"`
	}{Role: "assistant"}
	if mode != reasoningNone {
		msg.ReasoningContent = reasoning
	}
	for _, c := range calls {
		tc := toolCall{ID: c.CallID, Type: "function"}
		tc.Function.Name, tc.Function.Arguments = c.Name, c.Arguments
		msg.ToolCalls = append(msg.ToolCalls, tc)
	}
	if mode == reasoningTags && !jsonMode && len(calls) == 0 && reasoning != "" && text != "" {
		text = tagged(reasoning) + text
	}
	if text != "" || len(calls) == 0 {
		msg.Content = &text
	}
	type choice struct {
		Index        int    `json:"index"`
		Message      any    `json:"message"`
		FinishReason string `json:"finish_reason"`
	}
	return marshal(struct {
		ID      string    `json:"id"`
		Object  string    `json:"object"`
		Created int64     `json:"created"`
		Model   string    `json:"model"`
		Choices []choice  `json:"choices"`
		Usage   chatUsage `json:"usage"`
	}{id, "chat.completion", created, model, []choice{{0, msg, r.finishReason(len(calls) > 0)}}, r.usage()})
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
	jsonMode     bool
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
	buf, scratch []byte // reused: emit must not retain chunks
}

// newChatStream starts a chat stream; id, created and model appear in every chunk.
func newChatStream(id string, created int64, model string, mode reasoningMode, jsonMode, includeUsage bool) *chatStream {
	h := append([]byte(`{"id":`), marshal(id)...)
	h = append(h, `,"object":"chat.completion.chunk","created":`...)
	h = strconv.AppendInt(h, created, 10)
	h = append(append(append(h, `,"model":`...), marshal(model)...), `,"choices":[`...)
	return &chatStream{head: h, mode: mode, jsonMode: jsonMode, includeUsage: includeUsage,
		tagsDone: mode != reasoningTags || jsonMode}
}

// event translates one backend event into zero or more chunk JSON payloads, passed to emit in order.
// emit must not retain the slice (you may reuse a buffer). A response.failed / error event returns its *apiError.
func (s *chatStream) event(typ string, data []byte, emit func(chunk []byte) error) error {
	if s.done {
		return nil
	}
	switch typ {
	case "response.output_text.delta":
		id, delta, _, ok := s.fastDelta(data)
		if !ok {
			return nil
		}
		return s.text(id, delta, emit)
	case "response.reasoning_summary_text.delta", "response.reasoning_text.delta":
		id, delta, idx, ok := s.fastDelta(data)
		if !ok {
			return nil
		}
		s.markStreamed(id)
		return s.reasoning(id, typ[19], idx, delta, emit) // typ[19]: 's'ummary or 't'ext
	case "response.function_call_arguments.delta":
		id, delta, _, ok := s.fastDelta(data)
		for i := range s.calls {
			if ok && s.calls[i].itemID == string(id) {
				s.calls[i].argsSent = true
				return s.toolCall(i, nil, delta, emit)
			}
		}
		return nil
	}
	var ev backendEvent
	if err := json.Unmarshal(data, &ev); err != nil && !isTerminal(typ) && typ != "response.failed" && typ != "error" {
		return nil // an unknown or garbled event cannot change the answer
	}
	switch {
	case typ == "response.output_item.added":
		var it backendItem
		if json.Unmarshal(ev.Item, &it) == nil && it.Type == "function_call" {
			return s.newCall(&it, emit)
		}
	case typ == "response.output_item.done":
		s.sawItems = true
		return s.itemDone(ev.Item, emit)
	case isTerminal(typ):
		r := ev.Response
		if r == nil {
			r = &backendResponse{}
		}
		if !s.sawItems {
			// No output_item.done at all: the items exist only in response.completed.
			for _, raw := range r.Output {
				if err := s.itemDone(raw, emit); err != nil {
					return err
				}
			}
		}
		return s.finish(r, emit)
	case typ == "response.failed" || typ == "error":
		return eventError(&ev)
	}
	return nil
}

// fastDelta reads item_id, the decoded delta and the part index of a delta event. It scans
// the known shape without allocating and falls back to encoding/json for anything else.
func (s *chatStream) fastDelta(data []byte) (id, delta []byte, idx int, ok bool) {
	id, raw, idx, escaped, ok := scanDelta(data)
	if ok && !escaped {
		return id, raw, idx, true
	}
	if ok {
		if s.scratch, ok = unescape(s.scratch[:0], raw); ok {
			return id, s.scratch, idx, true
		}
	}
	var ev backendEvent
	if json.Unmarshal(data, &ev) != nil {
		return nil, nil, 0, false
	}
	return []byte(ev.ItemID), []byte(ev.Delta), ev.SummaryIndex + ev.ContentIndex, true
}

// markStreamed remembers that item id's text came as deltas.
func (s *chatStream) markStreamed(id []byte) {
	for _, v := range s.streamed {
		if v == string(id) {
			return
		}
	}
	s.streamed = append(s.streamed, string(id))
}

// open starts a chunk in s.buf, first sending the role chunk if it has not gone out yet. The
// role waits for the first real chunk so that a failure before any output can still be
// answered with a proper HTTP error status.
func (s *chatStream) open(emit func([]byte) error) error {
	if !s.roleSent {
		s.roleSent = true
		s.buf = append(append(s.buf[:0], s.head...), `{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}`...)
		if err := emit(s.buf); err != nil {
			return err
		}
	}
	s.buf = append(append(s.buf[:0], s.head...), `{"index":0,"delta":`...)
	return nil
}

// send ends the chunk in s.buf and emits it.
func (s *chatStream) send(emit func([]byte) error) error {
	s.buf = append(s.buf, `,"finish_reason":null}]}`...)
	return emit(s.buf)
}

// text emits answer text, preceded once by the held-back reasoning tags.
func (s *chatStream) text(id, text []byte, emit func([]byte) error) error {
	s.markStreamed(id)
	if !s.tagsDone {
		s.tagsDone = true
		if len(s.tags) > 0 {
			if err := s.content(`"content"`, []byte("<reasoning>"), s.tags, []byte("</reasoning>\n\n"), emit); err != nil {
				return err
			}
		}
	}
	return s.content(`"content"`, nil, text, nil, emit)
}

// content emits {key: pre+text+post} as one delta.
func (s *chatStream) content(key string, pre, text, post []byte, emit func([]byte) error) error {
	if err := s.open(emit); err != nil {
		return err
	}
	s.buf = append(append(append(s.buf, '{'), key...), ':', '"')
	s.buf = append(appendEscaped(appendEscaped(appendEscaped(s.buf, pre), text), post), '"', '}')
	return s.send(emit)
}

// reasoning streams a reasoning delta as reasoning_content and keeps it for the tags; a new
// summary part (or item) is separated from the previous one by a blank line.
func (s *chatStream) reasoning(id []byte, kind byte, idx int, delta []byte, emit func([]byte) error) error {
	if s.mode == reasoningNone {
		return nil
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
	return s.content(`"reasoning_content"`, sep, delta, nil, emit)
}

// newCall registers a function call and emits its id and name; the tags are dropped because
// the turn goes to tool calls (SPEC §4).
func (s *chatStream) newCall(it *backendItem, emit func([]byte) error) error {
	s.tagsDone = true
	s.calls = append(s.calls, toolCallState{it.ID, it.CallID, it.Arguments != ""})
	return s.toolCall(len(s.calls)-1, it, []byte(it.Arguments), emit)
}

// toolCall emits one tool_calls delta: the header (id, type, name) when it is given, else an
// arguments fragment.
func (s *chatStream) toolCall(i int, it *backendItem, args []byte, emit func([]byte) error) error {
	if err := s.open(emit); err != nil {
		return err
	}
	s.buf = strconv.AppendInt(append(s.buf, `{"tool_calls":[{"index":`...), int64(i), 10)
	if it != nil {
		s.buf = appendString(append(s.buf, `,"id":`...), []byte(it.CallID))
		s.buf = appendString(append(s.buf, `,"type":"function","function":{"name":`...), []byte(it.Name))
		s.buf = append(s.buf, ',')
	} else {
		s.buf = append(s.buf, `,"function":{`...)
	}
	s.buf = append(appendString(append(s.buf, `"arguments":`...), args), "}}]}"...)
	return s.send(emit)
}

// itemDone emits what a finished item holds that its deltas did not deliver: the whole text
// or reasoning of a sparse stream (the Codex fixtures send only output_item.done, §0), a call
// never announced, or arguments that never came as deltas.
func (s *chatStream) itemDone(raw json.RawMessage, emit func([]byte) error) error {
	var it backendItem
	if json.Unmarshal(raw, &it) != nil || slices.Contains(s.streamed, it.ID) && it.ID != "" {
		return nil
	}
	switch it.Type {
	case "message":
		if t := messageText(&it); t != "" {
			return s.text([]byte(it.ID), []byte(t), emit)
		}
	case "reasoning":
		for i, p := range slices.Concat(it.Content, it.Summary) {
			if err := s.reasoning([]byte(it.ID), 'd', i, []byte(p.Text), emit); err != nil {
				return err
			}
		}
	case "function_call":
		for i := range s.calls {
			if c := s.calls[i]; c.itemID == it.ID && it.ID != "" || c.callID == it.CallID && it.CallID != "" {
				if s.calls[i].argsSent || it.Arguments == "" {
					return nil
				}
				s.calls[i].argsSent = true
				return s.toolCall(i, nil, []byte(it.Arguments), emit)
			}
		}
		return s.newCall(&it, emit)
	}
	return nil
}

// finish emits the one chunk with a finish_reason and, when asked for, the usage chunk.
func (s *chatStream) finish(r *backendResponse, emit func([]byte) error) error {
	s.done = true
	if err := s.open(emit); err != nil {
		return err
	}
	s.buf = appendString(append(s.buf, `{},"finish_reason":`...), []byte(r.finishReason(len(s.calls) > 0)))
	if err := emit(append(s.buf, "}]}"...)); err != nil {
		return err
	}
	if !s.includeUsage {
		return nil
	}
	s.buf = append(append(append(s.buf[:0], s.head...), `],"usage":`...), marshal(r.usage())...)
	return emit(append(s.buf, '}'))
}

// scanDelta reads the top-level item_id, delta (raw, still escaped) and summary_index or
// content_index of a delta event without allocating. ok is false for any shape it does not
// expect (escaped keys, non-string values, bad syntax): the caller then uses encoding/json.
func scanDelta(data []byte) (id, delta []byte, idx int, escaped, ok bool) {
	i := skipSpace(data, 0)
	if i >= len(data) || data[i] != '{' {
		return
	}
	for i = skipSpace(data, i+1); i < len(data) && data[i] != '}'; {
		key, kesc, j := scanString(data, i)
		if j < 0 || kesc {
			return
		}
		if i = skipSpace(data, j); i >= len(data) || data[i] != ':' {
			return
		}
		i = skipSpace(data, i+1)
		switch string(key) {
		case "item_id", "delta":
			val, esc, j := scanString(data, i)
			if j < 0 || (esc && key[0] == 'i') {
				return
			}
			if key[0] == 'i' {
				id = val
			} else {
				delta, escaped = val, esc
			}
			i = j
		case "summary_index", "content_index":
			j := i
			for j < len(data) && data[j] >= '0' && data[j] <= '9' {
				j++
			}
			n, err := strconv.Atoi(string(data[i:j]))
			if err != nil {
				return
			}
			idx, i = n, j
		default:
			if i = skipValue(data, i); i < 0 {
				return
			}
		}
		if i = skipSpace(data, i); i < len(data) && data[i] == ',' {
			i = skipSpace(data, i+1)
		} else if i >= len(data) || data[i] != '}' {
			return
		}
	}
	return id, delta, idx, escaped, i < len(data) && delta != nil
}

// skipSpace returns the index of the first non-space byte at or after i.
func skipSpace(data []byte, i int) int {
	for i < len(data) && (data[i] == ' ' || data[i] == '\t' || data[i] == '\n' || data[i] == '\r') {
		i++
	}
	return i
}

// scanString reads the JSON string at data[i]; it returns its raw contents, whether they
// hold escapes, and the index after the closing quote (-1 if there is no string).
func scanString(data []byte, i int) (raw []byte, escaped bool, end int) {
	if i >= len(data) || data[i] != '"' {
		return nil, false, -1
	}
	for j := i + 1; j < len(data); j++ {
		switch data[j] {
		case '\\':
			escaped = true
			j++
		case '"':
			return data[i+1 : j], escaped, j + 1
		}
	}
	return nil, false, -1
}

// skipValue returns the index after the JSON value at data[i], or -1.
func skipValue(data []byte, i int) int {
	if i >= len(data) {
		return -1
	}
	switch data[i] {
	case '"':
		_, _, end := scanString(data, i)
		return end
	case '{', '[':
		depth := 0
		for j := i; j < len(data); j++ {
			switch data[j] {
			case '"':
				_, _, end := scanString(data, j)
				if end < 0 {
					return -1
				}
				j = end - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return j + 1
				}
			}
		}
		return -1
	}
	j := i
	for j < len(data) && strings.IndexByte(",}] \t\r\n", data[j]) < 0 {
		j++
	}
	if j == i {
		return -1
	}
	return j
}

// unescape appends the decoded contents of a raw JSON string to dst, as encoding/json would
// decode them (lone surrogates become U+FFFD); ok is false for a bad escape.
func unescape(dst, raw []byte) ([]byte, bool) {
	for i := 0; i < len(raw); i++ {
		c := raw[i]
		if c != '\\' {
			dst = append(dst, c)
			continue
		}
		if i++; i >= len(raw) {
			return dst, false
		}
		switch k := strings.IndexByte(`"\/bfnrt`, raw[i]); {
		case k >= 0:
			dst = append(dst, "\"\\/\b\f\n\r\t"[k])
		case raw[i] == 'u':
			r, ok := hex4(raw, i+1)
			if !ok {
				return dst, false
			}
			i += 4
			if utf16.IsSurrogate(r) {
				r2, ok := rune(0), false
				if i+2 < len(raw) && raw[i+1] == '\\' && raw[i+2] == 'u' {
					r2, ok = hex4(raw, i+3)
				}
				if d := utf16.DecodeRune(r, r2); ok && d != utf8.RuneError {
					r, i = d, i+6
				} else {
					r = utf8.RuneError
				}
			}
			dst = utf8.AppendRune(dst, r)
		default:
			return dst, false
		}
	}
	return dst, true
}

// hex4 decodes the four hex digits at raw[i:].
func hex4(raw []byte, i int) (rune, bool) {
	if i+4 > len(raw) {
		return 0, false
	}
	n, err := strconv.ParseUint(string(raw[i:i+4]), 16, 16)
	return rune(n), err == nil
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
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c < utf8.RuneSelf {
			dst = append(dst, s[start:i]...)
			if k := strings.IndexByte("\"\\\b\f\n\r\t", c); k >= 0 {
				dst = append(dst, '\\', `"\bfnrt`[k])
			} else {
				dst = append(dst, '\\', 'u', '0', '0', hex[c>>4], hex[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRune(s[i:])
		switch {
		case r == utf8.RuneError && size == 1:
			dst = append(append(dst, s[start:i]...), `\ufffd`...)
		case r == '\u2028' || r == '\u2029':
			dst = append(append(dst, s[start:i]...), '\\', 'u', '2', '0', '2', hex[r&0xf])
		default:
			i += size
			continue
		}
		i += size
		start = i
	}
	return append(dst, s[start:]...)
}
