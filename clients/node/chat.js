#!/usr/bin/env node
// Minimal Node.js client of the `internvl_chat` Triton ensemble (docs/contract.md).
// Streams one chat over gRPC ModelStreamInfer (one stream for the one request) and prints the text
// deltas as they arrive.
//
//   npm ci
//   node chat.js --url 127.0.0.1:8001 --image cat.png -q "What is in the image?" [--max-tokens 64]
//                [--temperature 0.7] [--stop '###'] [--metadata]
//
// Exit status: 0 done, 1 server error, 2 bad usage or invalid request, 3 server unavailable,
// 4 deadline exceeded (--timeout; the request is cancelled on the server first), 130 interrupted (likewise).
'use strict';

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = path.join(__dirname, 'proto');
const MODEL = 'internvl_chat';

const USAGE =
  'usage: node chat.js [--url HOST:PORT] [--image PATH]... -q QUESTION [--max-tokens N]\n' +
  '                    [--temperature T] [--top-p P] [--stop TEXT]... [--timeout SECONDS] [--metadata]\n';

// With a message: a usage error (stderr, exit 2); without: --help (stdout, exit 0).
function usage(message) {
  if (message === undefined) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  process.stderr.write(`chat.js: ${message}\n${USAGE}`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = { url: '127.0.0.1:8001', images: [], stop: [], timeout: 600, metadata: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`);
      return argv[++i];
    };
    if (a === '--url') args.url = value();
    else if (a === '--image') args.images.push(value());
    else if (a === '-q' || a === '--question') args.question = value();
    else if (a === '--max-tokens' || a === '--max-new-tokens') args.maxTokens = parseInt(value(), 10);
    else if (a === '--temperature') args.temperature = parseFloat(value());
    else if (a === '--top-p') args.topP = parseFloat(value());
    else if (a === '--stop') args.stop.push(value());
    else if (a === '--timeout') args.timeout = parseFloat(value());
    else if (a === '--metadata') args.metadata = true;
    else if (a === '-h' || a === '--help') usage();
    else usage(`unknown argument ${a}`);
  }
  if (args.question === undefined) usage('-q QUESTION is required');
  if (!(args.timeout > 0)) usage('--timeout must be a number of seconds > 0');
  if (args.maxTokens !== undefined && !(args.maxTokens >= 1)) usage('--max-tokens must be >= 1');
  return args;
}

// ---- request tensors (typed `contents`; Triton also accepts raw_input_contents) ----------------
const bytesTensor = (name, values) =>
  ({ name, datatype: 'BYTES', shape: [values.length], contents: { bytes_contents: values } });
const int32Tensor = (name, value) => ({ name, datatype: 'INT32', shape: [1], contents: { int_contents: [value] } });
const fp32Tensor = (name, value) => ({ name, datatype: 'FP32', shape: [1], contents: { fp32_contents: [value] } });
const boolTensor = (name, value) => ({ name, datatype: 'BOOL', shape: [1], contents: { bool_contents: [value] } });

function buildRequest(args) {
  const inputs = [bytesTensor('text_input', [Buffer.from(args.question, 'utf8')])];
  if (args.images.length) {
    // The encoded files as they are; the server decodes and resizes them.
    inputs.push(bytesTensor('images', args.images.map((p) => fs.readFileSync(p))));
  }
  if (args.maxTokens !== undefined) inputs.push(int32Tensor('max_tokens', args.maxTokens));
  if (args.temperature !== undefined) inputs.push(fp32Tensor('temperature', args.temperature));
  if (args.topP !== undefined) inputs.push(fp32Tensor('top_p', args.topP));
  if (args.stop.length) inputs.push(bytesTensor('stop_words', args.stop.map((s) => Buffer.from(s, 'utf8'))));
  inputs.push(boolTensor('stream', true));
  // A new secret per request: with the request's id it lets this client, and only it, cancel the
  // request on the llm model's side channel (docs/contract.md, Cancellation).
  const cancelKey = crypto.randomBytes(16).toString('hex');
  inputs.push(bytesTensor('cancel_key', [Buffer.from(cancelKey, 'utf8')]));
  return {
    model_name: MODEL,
    id: crypto.randomUUID(),
    cancelKey,
    inputs,
    // Ask Triton to flag the request's last response (sent empty if the model's last one had data).
    parameters: { triton_enable_empty_final_response: { bool_param: true } },
  };
}

// ---- response tensors --------------------------------------------------------------------------
// Triton returns outputs in raw_output_contents, in the order of `outputs`. BYTES: each element is a
// 4-byte little-endian length followed by the bytes; INT32: little-endian int32.
function decodeOutputs(inferResponse) {
  const out = {};
  const raws = inferResponse.raw_output_contents || [];
  (inferResponse.outputs || []).forEach((tensor, i) => {
    const raw = raws[i];
    if (!raw) return;
    if (tensor.datatype === 'BYTES') {
      out[tensor.name] = raw.length >= 4 ? raw.subarray(4, 4 + raw.readUInt32LE(0)) : Buffer.alloc(0);
    } else if (tensor.datatype === 'INT32') {
      out[tensor.name] = raw.length >= 4 ? raw.readInt32LE(0) : undefined;
    }
  });
  return out;
}

function loadService() {
  const definition = protoLoader.loadSync(path.join(PROTO_DIR, 'grpc_service.proto'), {
    includeDirs: [PROTO_DIR], keepCase: true, longs: String, enums: String, defaults: false, oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).inference.GRPCInferenceService;
}

// In-band errors carry no status code. Triton's own request checks and the composing models' messages
// ("in ensemble 'internvl_chat', ...") are the caller's mistakes, except internal failures, which the
// models prefix with "<model>: <ExceptionType>: " (docs/contract.md, Errors).
function invalidRequest(message) {
  if (/(^|, )(preprocess|vision|llm): [A-Za-z_][\w.]*: |stub process|failed to process the request|internal/i.test(message)) {
    return false;
  }
  return message.startsWith('in ensemble ') ||
    /unexpected inference input|data-type is|unexpected shape for input/i.test(message);
}

function exitCodeFor(status) {
  if (status === grpc.status.INVALID_ARGUMENT) return 2;
  if (status === grpc.status.UNAVAILABLE) return 3;
  if (status === grpc.status.DEADLINE_EXCEEDED) return 4;
  return 1;
}

// The cancellation side channel: one request to the `llm` model holding cancel_request_id and the
// request's cancel_key.
function sendCancel(client, requestId, cancelKey, timeoutMs) {
  return new Promise((resolve) => {
    const done = () => resolve();
    const timer = setTimeout(done, timeoutMs);
    const side = client.ModelStreamInfer(new grpc.Metadata(), { deadline: Date.now() + timeoutMs });
    side.on('data', () => { clearTimeout(timer); done(); });
    side.on('error', () => { clearTimeout(timer); done(); });
    side.write({ model_name: 'llm', id: `cancel-${requestId}`,
                 inputs: [bytesTensor('cancel_request_id', [Buffer.from(requestId, 'utf8')]),
                          bytesTensor('cancel_key', [Buffer.from(cancelKey, 'utf8')])] });
    side.end();
  });
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  let request;
  try {
    request = buildRequest(args);
  } catch (err) {
    usage(err.message);
  }
  const Service = loadService();
  const client = new Service(args.url, grpc.credentials.createInsecure(), {
    'grpc.max_send_message_length': -1, 'grpc.max_receive_message_length': -1,
  });
  // No `triton_grpc_error: true` metadata: with Triton 2.51 it crashed the server. A request's errors
  // therefore arrive in-band, as `error_message` without a status code (see invalidRequest()).
  // No gRPC deadline either: --timeout is this client's timer, which cancels the request on the server
  // (abandon()) before it leaves, as Ctrl-C does.
  const call = client.ModelStreamInfer(new grpc.Metadata());

  const decoder = new TextDecoder('utf-8');
  let finishReason = '';
  let counts = {};
  let finished = false;
  let exitCode = 0;
  let abandoned = false;

  // Leave the request early (Ctrl-C, --timeout): cancel the call, so Triton cancels the ensemble
  // request... but Triton 2.51 does not pass that on to the running llm step: ask the llm model to abort
  // the generation (docs/contract.md, Cancellation), then exit with `code`; at most 2 s.
  function abandon(message, code) {
    if (abandoned) return;
    abandoned = true;
    clearTimeout(deadline);
    call.cancel();
    process.stdout.write(decoder.decode());
    process.stderr.write(`\n${message}\n`);
    // (its own channel: the chat's closes when its stream ends)
    sendCancel(new Service(args.url, grpc.credentials.createInsecure()), request.id, request.cancelKey, 2000)
      .then(() => process.exit(code));
  }
  const deadline = setTimeout(() => abandon(
    `chat.js: DEADLINE_EXCEEDED: no complete answer within --timeout ${args.timeout} s; ` +
    `cancelled request ${request.id} on the server`, 4), args.timeout * 1000);
  process.on('SIGINT', () => abandon('[cancelled]', 130));

  call.on('data', (message) => {
    if (message.error_message) { // the request failed; the server ends the stream after this
      const invalid = invalidRequest(message.error_message);
      process.stderr.write(`\nchat.js: ${invalid ? 'invalid request' : 'server error'}: ${message.error_message}\n`);
      exitCode = invalid ? 2 : 1;
      return;
    }
    const response = message.infer_response;
    const outputs = decodeOutputs(response);
    if (outputs.text_output) process.stdout.write(decoder.decode(outputs.text_output, { stream: true }));
    if (outputs.finish_reason && outputs.finish_reason.length) finishReason = outputs.finish_reason.toString('utf8');
    for (const key of ['num_input_tokens', 'num_output_tokens']) {
      if (outputs[key] !== undefined) counts[key] = outputs[key];
    }
    const flag = response.parameters && response.parameters.triton_final_response;
    if (flag && flag.bool_param) finished = true;
  });
  call.on('error', (err) => {
    if (abandoned || err.code === grpc.status.CANCELLED) return;
    process.stdout.write(decoder.decode());
    process.stderr.write(`\nchat.js: ${grpc.status[err.code] || err.code}: ${err.details || err.message}\n`);
    exitCode = exitCodeFor(err.code);
  });
  call.on('status', () => {
    // The stream is over (after 'end' or 'error'): the server half-closes once the request is done.
    clearTimeout(deadline);
    if (abandoned) return; // abandon() exits once its cancellation is sent
    if (exitCode === 0) {
      process.stdout.write(decoder.decode() + '\n');
      if (!finished) {
        process.stderr.write('chat.js: the stream ended without a final response\n');
        exitCode = 1;
      } else if (args.metadata) {
        process.stderr.write(JSON.stringify({ finish_reason: finishReason, ...counts }) + '\n');
      }
    }
    client.close();
    process.exitCode = exitCode;
  });

  const { cancelKey, ...message } = request; // the key travels as an input, not as a field
  call.write(message);
  call.end(); // one request per stream: half-close now; Triton ends the stream after the final response
}

main();
