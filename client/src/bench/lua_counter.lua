-- The counter `statehouse bench --workload lua` deploys as `bench_lua` when the server has
-- no such type: the same increments as the built-in counter, run by the Lua engine.
function init(key, arg)
    return { value = 0 }
end

function handle_call(msg, state, ctx)
    if msg.op == "incr" then
        ctx.emit({ by = msg.by or 1 })
        return { value = state.value + (msg.by or 1) }
    elseif msg.op == "get" then
        return { value = state.value }
    end
    error({ invalid = "unknown op: " .. tostring(msg.op) })
end

function apply(state, event)
    state.value += event.by
    return state
end
