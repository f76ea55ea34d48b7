-- escape: each op tries to leave the sandbox or break a limit; "ok" proves the VM still works.
function init(key, arg)
    return {}
end

function handle_call(msg, state, ctx)
    local op = msg.op
    if op == "ok" then
        return "fine"
    elseif op == "os_execute" then
        return os.execute("touch /tmp/statehouse-escaped")
    elseif op == "io_open" then
        return io.open("/etc/passwd")
    elseif op == "require" then
        return require("os")
    elseif op == "load_bytecode" then
        return load("\27Lua bytecode")
    elseif op == "infinite_loop" then
        while true do
        end
    elseif op == "recursion" then
        local function deeper(n)
            return deeper(n + 1) + 1
        end
        return deeper(1)
    elseif op == "huge_string" then
        return #string.rep("x", 1024 * 1024 * 1024)
    elseif op == "growing_table" then
        local t = {}
        local i = 0
        while true do
            i += 1
            t[i] = string.rep("y", 1024) .. i
        end
    end
    error({ invalid = "unknown op: " .. tostring(op) })
end
